"""save_pretrained / load_pretrained: exact round trips, no pickle, refusals that name the problem."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from selfattn.config import ModelConfig
from selfattn.data.tokenization import BPETokenizer, CharTokenizer
from selfattn.errors import UserError
from selfattn.io.checkpoint import copy_pretrained, load_pretrained, save_pretrained
from selfattn.nn.lora import LoRAConfig, apply_lora
from selfattn.nn.models import DecoderLM, SequenceClassifier

TEXT = "to be, or not to be: that is the question\n"


@pytest.fixture()
def char_tok() -> CharTokenizer:
    return CharTokenizer.train([TEXT])


def _lm(tok, **kw) -> DecoderLM:
    torch.manual_seed(0)
    base = dict(vocab_size=tok.vocab_size, context_length=32, n_layers=2, d_model=32, n_heads=4)
    base.update(kw)
    return DecoderLM(ModelConfig(**base)).eval()


@pytest.fixture()
def no_pickle(monkeypatch):
    """Loading must not unpickle: make every unpickling entry point fail loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling was attempted")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=False, position="learned", norm="rmsnorm", mlp="swiglu")])
def test_lm_round_trip_is_exact(tmp_path, char_tok, no_pickle, kw):
    model = _lm(char_tok, **kw)
    ids = torch.tensor([char_tok.encode(TEXT[:20])])
    out = save_pretrained(model, tmp_path / "ckpt", tokenizer=char_tok, extra={"val_loss": 1.25, "step": 10})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["format_version"] == 1 and meta["task"] == "lm" and meta["classifier"] is None
    assert meta["model"] == model.cfg.model_dump(mode="json")

    loaded = load_pretrained(out)
    assert loaded.task == "lm" and loaded.config == model.cfg
    assert loaded.extra == {"val_loss": 1.25, "step": 10}
    assert isinstance(loaded.tokenizer, CharTokenizer) and loaded.tokenizer.chars == char_tok.chars
    assert not loaded.model.training
    assert torch.equal(loaded.model(ids).logits, model(ids).logits)  # bitwise
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    if model.cfg.tie_embeddings:
        assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))  # stored once
        assert loaded.model.lm_head.weight is loaded.model.tok_emb.weight  # re-tied
    else:
        assert loaded.model.lm_head.weight is not loaded.model.tok_emb.weight


@pytest.mark.parametrize("case", ["tied", "alibi", "bf16", "mixed", "classifier"])
def test_loaded_model_is_whole_trainable_and_leaves_the_file_alone(tmp_path, char_tok, case):
    """load_pretrained builds on the meta device and takes the file's tensors (ALiBi, whose slopes are
    a non-persistent buffer, is built for real): nothing stays on meta, dtypes are the file's (mixed:
    float32), and a training step changes the model, not the checkpoint."""
    if case == "classifier":
        torch.manual_seed(0)
        model = SequenceClassifier(ModelConfig(vocab_size=char_tok.vocab_size, context_length=32, n_layers=1, d_model=32, n_heads=4, n_classes=2)).eval()
    else:
        model = _lm(char_tok, position="alibi" if case == "alibi" else "rope")
    if case == "bf16":
        model.to(torch.bfloat16)
    if case == "mixed":
        model.tok_emb.to(torch.bfloat16)
    out = save_pretrained(model, tmp_path / "ckpt", tokenizer=char_tok)
    loaded = load_pretrained(out).model
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    want = {"bf16": torch.bfloat16}.get(case, torch.float32)
    assert {p.dtype for p in loaded.parameters()} == {want} and all(p.requires_grad for p in loaded.parameters())
    ids = torch.tensor([char_tok.encode(TEXT[:20])])
    if case != "mixed":  # the mixed file loads in float32, unlike the mixed model it came from
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    if case == "alibi":
        torch.testing.assert_close(loaded.blocks[0].attn.alibi_slopes, model.blocks[0].attn.alibi_slopes)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    loaded.train()
    out_ = loaded(ids, labels=torch.tensor([1])) if case == "classifier" else loaded(ids, targets=ids)
    out_.loss.float().backward()
    torch.optim.SGD(loaded.parameters(), lr=0.5).step()
    assert any(not torch.equal(v, loaded.state_dict()[k]) for k, v in before.items())
    again = load_pretrained(out).model.state_dict()
    assert all(torch.equal(again[k], v) for k, v in before.items())


def test_classifier_round_trip_with_bpe(tmp_path, no_pickle):
    tok = BPETokenizer.train([TEXT] * 3, vocab_size=270)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=32, n_layers=2, d_model=32, n_heads=4, n_classes=3)
    clf = SequenceClassifier(cfg, pooling="last", causal=True).eval()
    save_pretrained(clf, tmp_path / "clf", tokenizer=tok)
    meta = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert meta["task"] == "classifier"
    assert meta["classifier"] == {"n_classes": 3, "pooling": "last", "causal": True}
    loaded = load_pretrained(tmp_path / "clf")
    assert isinstance(loaded.model, SequenceClassifier)
    assert loaded.model.pooling == "last" and loaded.model.causal is True
    assert isinstance(loaded.tokenizer, BPETokenizer)
    rows = tok.encode_batch(["to be", "or not to be: that"])
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    assert torch.equal(loaded.model(ids, mask).logits, clf(ids, mask).logits)


def test_lora_model_is_saved_merged(tmp_path, char_tok):
    model = _lm(char_tok)
    apply_lora(model, LoRAConfig(rank=2, alpha=4))
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_(std=0.1)
    ids = torch.tensor([char_tok.encode(TEXT[:16])])
    save_pretrained(model, tmp_path / "lora")
    loaded = load_pretrained(tmp_path / "lora")
    assert loaded.tokenizer is None
    assert not any("lora" in k for k in loaded.model.state_dict())
    torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_refuses_unexpected_files(tmp_path, char_tok):
    ckpt = save_pretrained(_lm(char_tok), tmp_path / "ckpt", tokenizer=char_tok)
    (ckpt / "README.md").write_text("notes")  # a README is fine
    load_pretrained(ckpt)
    (ckpt / "optimizer.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(UserError, match=r"unexpected file .*optimizer\.pt"):
        load_pretrained(ckpt)
    (ckpt / "optimizer.pt").unlink()
    (ckpt / "tokenizer" / "merges.pkl").write_bytes(b"x")
    with pytest.raises(UserError, match=r"merges\.pkl"):
        load_pretrained(ckpt)
    (ckpt / "tokenizer" / "merges.pkl").unlink()
    (ckpt / "config.json").unlink()
    with pytest.raises(UserError, match="config.json is missing"):
        load_pretrained(ckpt)
    with pytest.raises(UserError, match="not found"):
        load_pretrained(tmp_path / "nowhere")


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path, char_tok):
    ckpt = save_pretrained(_lm(char_tok), tmp_path / "ckpt")
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"]["d_ff"] = 64  # a different config than the weights were saved with
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"'blocks\.0\.mlp\.up_proj\.weight' has shape \(128, 32\).*expects \(64, 32\)"):
        load_pretrained(ckpt)


def test_missing_and_unexpected_tensors_are_named(tmp_path, char_tok):
    ckpt = save_pretrained(_lm(char_tok), tmp_path / "ckpt")
    tensors = load_file(str(ckpt / "model.safetensors"))
    dropped = tensors.pop("norm_f.weight")
    save_file(tensors, str(ckpt / "model.safetensors"))
    meta = json.loads((ckpt / "config.json").read_text())
    del meta["weights_sha256"]  # weights rewritten by hand: no digest to check them against
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"'norm_f\.weight' is missing \(expected shape \(32,\)\)"):
        load_pretrained(ckpt)
    tensors["norm_f.weight"] = dropped
    tensors["blocks.9.extra"] = torch.zeros(3)
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(UserError, match=r"unexpected tensor 'blocks\.9\.extra' with shape \(3,\)"):
        load_pretrained(ckpt)


def test_save_is_atomic_and_replaces_old_checkpoints(tmp_path, char_tok):
    first = _lm(char_tok)
    ckpt = save_pretrained(first, tmp_path / "ckpt", extra={"version": 1})
    old_bytes = (ckpt / "model.safetensors").read_bytes()

    class BrokenTokenizer(CharTokenizer):
        def save(self, directory):
            raise OSError("disk full")

    broken = BrokenTokenizer(chars=char_tok.chars)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(_lm(char_tok, n_layers=1), ckpt, tokenizer=broken, extra={"version": 2})
    assert (ckpt / "model.safetensors").read_bytes() == old_bytes  # the old checkpoint survived
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp directories left
    assert load_pretrained(ckpt).extra == {"version": 1}

    save_pretrained(_lm(char_tok, n_layers=1), ckpt, extra={"version": 2})
    loaded = load_pretrained(ckpt)
    assert loaded.extra == {"version": 2} and loaded.config.n_layers == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_refuses_to_overwrite_a_foreign_directory(tmp_path, char_tok):
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "important.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="refusing to overwrite"):
        save_pretrained(_lm(char_tok), foreign)
    assert (foreign / "important.csv").exists()
    with pytest.raises(ValueError, match="JSON-serializable"):
        save_pretrained(_lm(char_tok), tmp_path / "x", extra={"bad": object()})


def test_copy_is_byte_identical_replaces_a_checkpoint_and_refuses_foreign_directories(tmp_path, char_tok):
    src = save_pretrained(_lm(char_tok), tmp_path / "src", tokenizer=char_tok, extra={"version": 1})
    files = {p.relative_to(src): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    dst = save_pretrained(_lm(char_tok, n_layers=1), tmp_path / "out" / "copy", extra={"version": 0})

    assert copy_pretrained(src, dst) == dst  # an older checkpoint at dst is replaced
    assert {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()} == files
    assert sorted(p.name for p in dst.parent.iterdir()) == ["copy"]  # no temp directories left
    (dst / "config.json").write_text("{}")  # changing the copy leaves the source as it was
    assert {p.relative_to(src): p.read_bytes() for p in src.rglob("*") if p.is_file()} == files

    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "important.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="refusing to overwrite"):
        copy_pretrained(src, foreign)
    with pytest.raises(UserError, match="unexpected file"):
        copy_pretrained(foreign, tmp_path / "y")
    assert (foreign / "important.csv").exists() and not (tmp_path / "y").exists()


def test_a_tokenizer_larger_than_the_embedding_is_refused_everywhere_and_nothing_is_written(tmp_path, char_tok, capsys, monkeypatch):
    """A tokenizer whose ids run past the embedding (a model of 10 rows, a tokenizer of more): save, load,
    export and the CLI refuse it naming both sizes, and leave no output behind."""
    from selfattn.cli import main
    from selfattn.io.hf import export_hf
    from selfattn.nn.models import Encoder

    monkeypatch.setenv("SELFATTN_HOME", str(tmp_path / "home"))
    n = char_tok.vocab_size
    small = Encoder({"vocab_size": n - 3, "context_length": 16, "n_layers": 1, "d_model": 16, "n_heads": 2, "norm_position": "post",
                     "embedding_norm": True, "type_vocab_size": 2, "position": "learned", "bias": True})  # fmt: skip
    sizes = f"the tokenizer has {n} tokens but the model's embedding only {n - 3} rows"
    with pytest.raises(UserError, match=sizes):
        save_pretrained(small, tmp_path / "ckpt", tokenizer=char_tok)
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(UserError, match=sizes):
        export_hf(small, tmp_path / "hf", tokenizer=char_tok)
    assert not (tmp_path / "hf").exists()

    # a checkpoint whose tokenizer was swapped afterwards: loading it (library, convert, fine-tune) is refused
    save_pretrained(small, tmp_path / "ckpt")
    char_tok.save(tmp_path / "ckpt" / "tokenizer")
    with pytest.raises(UserError, match=sizes):
        load_pretrained(tmp_path / "ckpt")
    for args, out in ((["convert", "--to-hf", str(tmp_path / "ckpt"), str(tmp_path / "o1")], tmp_path / "o1"),
                      (["finetune", "--set", f"init_from={tmp_path / 'ckpt'}", "--set", "data.train_path=unused.tsv", "--output", str(tmp_path / "o2")], tmp_path / "o2")):  # fmt: skip
        assert main(args) == 2
        err = capsys.readouterr().err
        assert sizes in err and "Traceback" not in err, err
        assert not out.exists(), out
