"""`ltp-compress predict` input handling (pipeline/predict.py, modeling/prediction.check_texts): invalid
UTF-8 lines, empty texts, pairs for a single-sentence model and the reverse, unknown TSV columns,
truncation. The task comes from the fake run folder around the checkpoint (tests/test_serve.py)."""

from __future__ import annotations

import io
import sys

import pytest

from ltp_compress.pipeline.cli import main

from test_serve import build_served_models


@pytest.fixture(scope="module")
def served(tiny_bert, tmp_path_factory):
    return build_served_models(tiny_bert, tmp_path_factory.mktemp("predict_cli"))


def _stdin(monkeypatch, data: bytes):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_invalid_utf8_line_is_reported_and_the_good_lines_classified(served, monkeypatch, capsys):
    _stdin(monkeypatch, b"ok text\n\xff\xfe bad\nanother good one\n")
    assert main(["predict", str(served["sst2"])]) == 1
    out, err = capsys.readouterr()
    assert [l.split("\t")[2] for l in out.splitlines()] == ["ok text", "another good one"]
    assert "stdin line 2: not valid UTF-8 (byte 0xff at column 1); skipped" in err and "1 input(s) skipped, 2 classified" in err


def test_invalid_utf8_in_a_tsv_names_the_file_and_line(served, tmp_path, capsys):
    f = tmp_path / "in.tsv"
    f.write_bytes(b"sentence\tlabel\na fine film\t1\ncaf\xe9 bad\t0\n")
    assert main(["predict", str(served["sst2"]), "--tsv", str(f)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[0].endswith("\ta fine film") and len(out.splitlines()) == 1
    assert f"{f} line 3: not valid UTF-8 (byte 0xe9 at column 4)" in err


def test_empty_texts_and_wrong_kinds_are_reported(served, capsys):
    assert main(["predict", str(served["sst2"]), "a fine film", "   ", "dull ||| long"]) == 1
    out, err = capsys.readouterr()
    assert [l.split("\t")[2] for l in out.splitlines()] == ["a fine film"]
    assert "argument 2: empty text; skipped" in err and "argument 3: this model classifies single sentences; got a pair" in err
    assert main(["predict", str(served["mrpc"]), "a ||| b", "only one", "x ||| "]) == 1
    out, err = capsys.readouterr()
    assert [l.split("\t")[2] for l in out.splitlines()] == ["a ||| b"]
    assert "argument 2: this model classifies sentence pairs" in err and "argument 3: empty text" in err


def test_unknown_tsv_columns_refused_for_a_single_sentence_model(served, tmp_path, capsys):
    f = tmp_path / "foo.tsv"
    f.write_text("foo\tbar\nx\ty\n")
    assert main(["predict", str(served["sst2"]), "--tsv", str(f)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "unknown columns 'foo', 'bar'" in err and "single sentences" in err and "sentence" in err
    g = tmp_path / "pairs.tsv"
    g.write_text("sentence1\tsentence2\nx\ty\n")
    assert main(["predict", str(served["sst2"]), "--tsv", str(g)]) == 2
    assert "'sentence1', 'sentence2' are a sentence pair" in capsys.readouterr().err
    # the pair model reads the same files as pairs; a GLUE dev file 'sentence<TAB>label' still works for sst2
    assert main(["predict", str(served["mrpc"]), "--tsv", str(g)]) == 0
    assert capsys.readouterr().out.split("\t")[2].strip() == "x ||| y"
    h = tmp_path / "dev.tsv"
    h.write_text("sentence\tlabel\na fine film\t1\n")
    assert main(["predict", str(served["sst2"]), "--tsv", str(h)]) == 0


def test_truncation_is_reported(served, capsys):
    long = " ".join(["the film is good"] * 60)
    assert main(["predict", str(served["sst2"]), long, "short"]) == 0
    err = capsys.readouterr().err
    assert "note: argument 1: 242 tokens, truncated to max_seq_length 128" in err and "argument 2" not in err


def test_task_option_and_unknown_task(served, capsys):
    assert main(["predict", str(served["sst2"]), "a ||| b", "--task", "mrpc"]) == 0  # --task overrides the run's
    assert main(["predict", str(served["sst2"]), "a", "--task", "nonsense"]) == 2
    assert "task 'nonsense': unknown" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--threads", "--batch-size", "--streams"])
@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_count_options_below_one_are_usage_errors(tmp_path, capsys, option, value):
    from ltp_compress.pipeline.cli import main

    with pytest.raises(SystemExit) as e:
        main(["predict", str(tmp_path), "a text", option, value])
    assert e.value.code == 2 and f"argument {option}" in capsys.readouterr().err
