"""Word- and character-level corpora in the awd-lstm layout, and `sharnn data ptb|ptb-char|wikitext-*`."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sharnn.cli import main
from sharnn.data import load_corpus, prepare_awd
from sharnn.errors import SharnnError
from sharnn.vocab import Vocab


def write_layout(folder: Path, train: str, valid: str, test: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"{name}.txt").write_text(text)
    return folder


def test_word_vocab_order_and_eos() -> None:
    v = Vocab.from_words(["b a b", "c"])
    assert v.symbols == ("b", "a", "<eos>", "c") and v.metric == "ppl"
    assert v.encode_lines(["a b", "c c"]).tolist() == [1, 0, 2, 3, 3, 2]
    assert v.encode(b"a b\nc").tolist() == [1, 0, 2, 3]  # no <eos> after an unfinished last line
    assert v.encode(b"a b\n").tolist() == [1, 0, 2]
    assert v.decode([1, 0, 2, 3]) == b"a b \nc "
    assert Vocab.from_dict(v.to_dict()) == v


def test_word_corpus_from_train_vocabulary(tmp_path: Path) -> None:
    d = write_layout(tmp_path / "w", "the cat sat\nthe dog\n", "the dog sat\n", "cat cat\n")
    c = load_corpus(d, tokens="words")
    assert c.vocab.symbols == ("the", "cat", "sat", "<eos>", "dog")
    assert c.train.tolist() == [0, 1, 2, 3, 0, 4, 3]
    assert c.valid.tolist() == [0, 4, 2, 3] and c.test.tolist() == [1, 1, 3]
    assert c.train.dtype == np.int32


def awd_tokens(path: Path) -> list[str]:
    """awd-lstm's data.py, Corpus.tokenize: `for line in open(path, 'r', encoding='utf-8')`, then
    `line.split() + ['<eos>']` (a text file iterates over lines with Python's universal newlines)."""
    with open(path, encoding="utf-8") as f:
        return [w for line in f for w in line.split() + ["<eos>"]]


def test_lines_break_where_the_original_breaks_them(tmp_path: Path) -> None:
    # str.splitlines() also breaks at \v \f \x1c \x1d \x1e \x85 \u2028 \u2029: awd-lstm's reading does not (there
    # they separate words, as whitespace does). \r\n and a lone \r do end a line there, as \n does.
    odd = "a\vb\fc\x1cd\x1de\x1ef\x85g\u2028h\u2029i"
    train = f"one {odd} two\nthree\r\nfour\rfive\n\nsix"
    d = tmp_path / "w"
    d.mkdir()
    for name, text in (("train", train), ("valid", f"two {odd}\r\n"), ("test", "six\x85one\n")):
        (d / f"{name}.txt").write_bytes(text.encode())
    c = load_corpus(d, tokens="words")
    for name in ("train", "valid", "test"):
        assert [c.vocab.symbols[i] for i in c.split(name)] == awd_tokens(d / f"{name}.txt")
    assert [c.vocab.symbols[i] for i in c.train].count("<eos>") == 6
    # A prompt or a scored line is cut the same way (and a text that stops mid-line has no <eos> at its end).
    ids = c.vocab.encode(f"one {odd}\r\ntwo".encode())
    assert [c.vocab.symbols[i] for i in ids] == ["one", *"abcdefghi", "<eos>", "two"]


def test_unknown_words_are_named_or_mapped_to_unk(tmp_path: Path) -> None:
    d = write_layout(tmp_path / "w", "a b c\n", "a zebra\n", "quokka b\n")
    with pytest.raises(SharnnError, match=r"valid split .* 1 words .*\['zebra'\]"):
        load_corpus(d, tokens="words")
    d = write_layout(tmp_path / "u", "a <unk> b\n", "a zebra\n", "quokka b\n")
    c = load_corpus(d, tokens="words")
    unk = c.vocab.symbols.index("<unk>")
    assert c.valid.tolist()[1] == unk and c.test.tolist()[0] == unk


def test_char_level_layout_reports_bpc(tmp_path: Path) -> None:
    d = write_layout(tmp_path / "c", "a b _ c a\n", "a _ b\n", "c\n")
    c = load_corpus(d, tokens="chars")
    assert c.vocab.level == "char" and c.vocab.metric == "bpc"
    assert c.vocab.symbols == ("a", "b", "_", "c", "<eos>")


def test_non_utf8_word_corpus_is_refused_but_bytes_work(tmp_path: Path) -> None:
    d = write_layout(tmp_path / "l1", "x", "y", "z")
    (d / "train.txt").write_bytes("café au lait\n".encode("latin-1") * 20)
    with pytest.raises(SharnnError, match="not UTF-8"):
        load_corpus(d, tokens="words")
    assert len(load_corpus(d, tokens="bytes").train) == 13 * 20


def _ptb_tgz(path: Path) -> Path:
    files = {
        "ptb.train.txt": b" the cat sat \n the dog <unk> \n" * 20, "ptb.valid.txt": b" the cat \n",
        "ptb.test.txt": b" the dog \n", "ptb.char.train.txt": b"t h e _ c a t\n" * 20,
        "ptb.char.valid.txt": b"c a t\n", "ptb.char.test.txt": b"t h e\n",
    }
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(f"./simple-examples/data/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_prepare_ptb_and_ptb_char(tmp_path: Path) -> None:
    tgz = _ptb_tgz(tmp_path / "simple-examples.tgz")
    sizes = prepare_awd("ptb", tmp_path / "ptb", archive=tgz)
    assert sizes == {"train": 600, "valid": 10, "test": 10}
    assert json.loads((tmp_path / "ptb" / "meta.json").read_text())["tokens"] == "words"
    c = load_corpus(tmp_path / "ptb")  # tokens=auto follows meta.json
    assert c.vocab.kind == "words" and c.vocab.level == "word"
    assert main(["data", "ptb-char", str(tmp_path / "pc"), "--from-archive", str(tgz)]) == 0
    assert load_corpus(tmp_path / "pc").vocab.level == "char"
    with pytest.raises(SharnnError, match="already holds train.txt, valid.txt, test.txt, meta.json"):
        prepare_awd("ptb", tmp_path / "ptb", archive=tgz)  # the splits are replaced only with --overwrite
    assert prepare_awd("ptb", tmp_path / "ptb", archive=tgz, overwrite=True) == sizes
    # the download path, through a local file:// address
    prepare_awd("ptb", tmp_path / "dl", url=tgz.resolve().as_uri())
    assert (tmp_path / "dl" / "train.txt").read_bytes() == (tmp_path / "ptb" / "train.txt").read_bytes()


def test_prepare_wikitext_and_bad_archives(tmp_path: Path) -> None:
    z = tmp_path / "wikitext-2-v1.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for split in ("train", "valid", "test"):
            zf.writestr(f"wikitext-2/wiki.{split}.tokens", f" = Title = \n words in {split} \n")
    assert prepare_awd("wikitext-2", tmp_path / "wt2", archive=z)["train"] > 0
    with pytest.raises(SharnnError, match="has no wiki.train.tokens"):
        prepare_awd("wikitext-103", tmp_path / "x", archive=_ptb_tgz(tmp_path / "p.tgz"))
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not an archive at all")
    with pytest.raises(SharnnError, match="damaged"):
        prepare_awd("ptb", tmp_path / "y", archive=bad)


def test_word_model_trains_evaluates_generates_scores(tmp_path: Path, capsys) -> None:
    d = write_layout(tmp_path / "w", "the cat sat on the mat\nthe dog sat\n" * 40, "the cat sat\n" * 3,
                     "the dog sat on the mat\n" * 3)
    run = tmp_path / "run"
    flags = ["--emsize", "16", "--nhid", "32", "--nlayers", "2", "--attn-layers", "1", "--attn-span", "16",
             "--bptt", "8", "--batch_size", "2", "--test-batch-size", "2", "--max-steps", "40", "--lr", "1e-2",
             "--warmup", "5", "--quiet", "--json"]
    assert main(["train", "--data", str(d), "--tokens", "words", "--save", str(run), *flags]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["test_ppl"] < 7  # 6 words + <eos>: better than uniform after training
    assert main(["eval", str(run), "--split", "valid", "--batch_size", "1", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["metric"] == "ppl" and ev["ppl"] < 7
    assert main(["generate", str(run), "--prompt", "the", "-n", "6", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the ") and len(out.split()) >= 4
    assert main(["score", str(run), "--json", str(d / "valid.txt")]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rows[0]["tokens"] == 4  # the cat sat <eos>


def test_adaptive_softmax(tmp_path: Path, capsys) -> None:
    import math

    import torch

    from sharnn.config import SHARNNConfig, auto_cutoffs
    from sharnn.model import SHARNN

    assert auto_cutoffs(10_000) == () and auto_cutoffs(267_735) == (2800, 20000, 76000)
    assert auto_cutoffs(800_000) == (4200, 35000, 180000)
    with pytest.raises(SharnnError, match="--no-tied"):
        SHARNNConfig(vocab_size=50, emsize=16, nhid=32, adaptive_cutoffs=(10, 20))
    with pytest.raises(SharnnError, match="increase strictly"):
        SHARNNConfig(vocab_size=50, emsize=16, nhid=32, adaptive_cutoffs=(20, 10), tied=False)
    cfg = SHARNNConfig(vocab_size=50, emsize=16, nhid=32, nlayers=2, attn_layers=(1,), adaptive_cutoffs=(10, 30),
                       tied=False)
    model = SHARNN(cfg).eval()
    x = torch.randint(0, 50, (12, 3))
    out = model(x[:-1], targets=x[1:])
    assert out.logits is None  # the full distribution is not formed when the loss is asked for
    logp = model(x[:-1]).logits  # ... but it is there for generation and scoring
    assert torch.allclose(logp.exp().sum(-1), torch.ones(11, 3), atol=1e-5)
    nll = -logp.gather(-1, x[1:].unsqueeze(-1)).mean()
    assert out.loss.item() == pytest.approx(nll.item(), rel=1e-5)  # perplexity from the loss is exact

    # End to end on a word corpus, the cutoffs given explicitly (the automatic ones need a 75k+ vocabulary).
    words = " ".join(f"w{i}" for i in range(40))
    d = write_layout(tmp_path / "w", (words + "\n") * 20, words + "\n", words + "\n")
    run = tmp_path / "run"
    assert main(["train", "--data", str(d), "--tokens", "words", "--save", str(run), "--emsize", "16", "--nhid",
                 "32", "--nlayers", "2", "--attn-layers", "1", "--bptt", "8", "--batch_size", "2",
                 "--test-batch-size", "1", "--max-steps", "5", "--adaptive-cutoffs", "8", "20", "--no-tied",
                 "--quiet", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert math.isfinite(res["test_ppl"]) and res["metric"] == "ppl"
    assert main(["generate", str(run), "--prompt", "w1 w2", "-n", "5", "--seed", "1"]) == 0
    assert len(capsys.readouterr().out.split()) == 7


def test_byte_model_refuses_word_corpus(tmp_path: Path) -> None:
    from sharnn.vocab import BYTES

    tgz = _ptb_tgz(tmp_path / "s.tgz")
    prepare_awd("ptb", tmp_path / "ptb", archive=tgz)
    with pytest.raises(SharnnError, match="reads bytes"):
        load_corpus(tmp_path / "ptb", vocab=BYTES)


def test_address_that_is_not_a_url(tmp_path: Path) -> None:
    with pytest.raises(SharnnError, match="cannot fetch"):
        prepare_awd("ptb", tmp_path / "x", url="example.com/simple-examples.tgz")
