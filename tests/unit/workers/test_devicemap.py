"""The device map: pieces per GPU slot, sizes from the config (held to the built modules), and the check
that names the piece that does not fit."""

import dataclasses

import pytest

from workers import devicemap
from workers.config import GenerationConfig, ParallelConfig, get_config
from workers.model.dit import CausalWanModel
from workers.model.vae import TinyVAE

GIB = 1 << 30


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_parameter_counts_equal_the_built_slices(name):
    cfg = get_config(name)
    whole = params(CausalWanModel(cfg))
    assert whole == cfg.num_layers * devicemap.block_parameters(cfg) + devicemap.embed_parameters(cfg) \
        + devicemap.head_parameters(cfg)
    middle = params(CausalWanModel(cfg, (1, 3), with_embed=False, with_head=False))
    assert middle == 2 * devicemap.block_parameters(cfg)


def test_tiny_decoder_and_kv_sizes_equal_what_a_stream_allocates():
    gen = GenerationConfig(model=get_config("tiny"))
    weights, _ = devicemap.decoder_bytes(gen, 4)
    vae = dict(TinyVAE(gen.model).named_parameters())
    assert weights == 4 * sum(p.numel() for n, p in vae.items() if not n.startswith("enc"))
    assert devicemap.encoder_bytes(gen, 4) == 4 * sum(p.numel() for n, p in vae.items() if n.startswith("enc"))
    from tests.engine_cases import collect, local_executor, make_engine

    executor = local_executor(gen, 1)
    engine = make_engine(gen, executor)
    engine.add_stream("a", "p", 0)
    collect(engine, {"a": 4})  # recache_frames (9) of history
    engine.set_prompt("a", "q")  # a full re-cache: the longest forward a stream makes
    collect(engine, {"a": 6})
    assert executor.cache_bytes()[0] == devicemap.kv_stream_bytes(gen, gen.model.num_layers, 4)


def test_placement_of_pieces_per_slot():
    gen = GenerationConfig(model="wan2.1-1.3b")
    shared = devicemap.plan(gen, ParallelConfig(stages=2, dtype="bfloat16"))
    assert shared.slots == 2
    assert [p.name for p in shared.on(0)] == ["stage 0 (blocks 0-14, embeddings)", "text encoder (umt5)",
                                              "VAE encoder (wan, video-to-video)"]
    assert [p.name for p in shared.on(1)] == ["stage 1 (blocks 15-29, head)", "decode worker 0 (wan VAE, shared)"]
    dedicated = devicemap.plan(gen, ParallelConfig(stages=2, decode="dedicated", decode_workers=2))
    assert dedicated.slots == 4 and [p.slot for p in dedicated.pieces if p.name.startswith("decode")] == [2, 3]
    taehv = devicemap.plan(dataclasses.replace(gen, model=get_config("wan2.1-1.3b", vae_decoder="taehv")),
                           ParallelConfig(stages=1, dtype="bfloat16"))
    dec = next(p for p in taehv.pieces if p.name.startswith("decode"))
    assert dec.name == "decode worker 0 (TAEHV, shared)" and dec.weight_bytes == 2 * 9_844_611
    assert dec.stream_bytes < 0.1 * GIB < devicemap.decoder_bytes(gen, 2)[1]  # far below the Wan VAE's state
    assert shared.max_streams() is None  # no memory known: not bounded by memory


def test_check_names_the_piece_that_does_not_fit_and_memory_bounds_streams():
    gen = GenerationConfig(model="wan2.1-1.3b")
    par = ParallelConfig(stages=2, dtype="bfloat16", gpu_memory_gib=80)
    dmap = devicemap.plan(gen, par)
    dmap.check()
    assert dmap.max_streams() == min((dmap.usable_bytes(s) - dmap.weight_bytes(s)) // dmap.stream_bytes(s)
                                     for s in range(2)) > 0
    with pytest.raises(ValueError, match=r"text encoder \(umt5\) does not fit on slot 0"):
        devicemap.plan(gen, dataclasses.replace(par, gpu_memory_gib=10)).check()
    with pytest.raises(ValueError, match=r"stage 0 \(blocks 0-14, embeddings\): one stream's state"):
        devicemap.plan(gen, dataclasses.replace(par, gpu_memory_gib=14)).check()
    # measured free memory after loading (less the reserve) bounds it too
    free = [int(30 * GIB), int(30 * GIB)]
    assert dmap.max_streams(free) == min((30 * GIB - 8 * GIB) // dmap.stream_bytes(s) for s in range(2))


def test_local_slots_need_a_gpu_per_slot():
    assert devicemap.local_slots(ParallelConfig(stages=2, backend="local"), 0) == ["cpu", "cpu"]
    assert devicemap.local_slots(ParallelConfig(stages=2, backend="local"), 2) == ["cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match=r"decode worker 0 \(dedicated\) needs GPU slot 2"):
        devicemap.local_slots(ParallelConfig(stages=2, backend="local", decode="dedicated"), 2)
    with pytest.raises(ValueError, match="stage 1 needs GPU slot 1"):
        devicemap.local_slots(ParallelConfig(stages=2, backend="local"), 1)
