"""The demo model's world: synthetic clips (``clips``), the quality detector (``detect``) and the trainer
(``train``, ``make train-demo``). Its weights ship in ``workers/weights/``."""
