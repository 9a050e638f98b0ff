"""Text encoders: the small hash encoder and the real umT5 path, loaded from a directory the test builds."""

import pytest
import torch

from workers.model.text import HashTextEncoder, UMT5TextEncoder


def test_hash_encoder_is_deterministic_padded_and_cached():
    enc = HashTextEncoder(text_len=8, text_dim=16)
    a = enc("A red fox")
    assert a.shape == (8, 16)
    assert torch.equal(a, HashTextEncoder(8, 16)("a red fox"))  # fresh instance, same result
    assert (a[3:] == 0).all() and (a[:3] != 0).any(dim=1).all()  # zero rows after the prompt's 3 words
    assert not torch.equal(a, enc("a blue fox"))
    calls = enc.encode_calls
    enc("A red fox")
    assert enc.encode_calls == calls  # served from the per-prompt cache


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("umt5")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in "a red blue fox cat runs through snow".split():
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(path)
    cfg = transformers.UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                  decoder_start_token_id=0)
    torch.manual_seed(0)
    transformers.UMT5EncoderModel(cfg).save_pretrained(path)
    return str(path)


def test_umt5_encoder_from_local_directory(umt5_dir):
    enc = UMT5TextEncoder(umt5_dir, text_len=6, text_dim=32)
    out = enc("a red fox runs")
    assert out.shape == (6, 32) and out.dtype == torch.float32
    assert (out[4:] == 0).all() and (out[:4].abs().sum(1) > 0).all()  # 4 tokens; padding rows zeroed
    assert torch.equal(out, UMT5TextEncoder(umt5_dir, 6, 32)("a red fox runs"))
    assert not torch.equal(out, enc("a blue cat runs"))


def test_umt5_encoder_errors(umt5_dir, tmp_path):
    with pytest.raises(FileNotFoundError):
        UMT5TextEncoder(str(tmp_path / "absent"), 6, 32)
    with pytest.raises(ValueError, match="text_dim=64"):
        UMT5TextEncoder(umt5_dir, 6, 64)
