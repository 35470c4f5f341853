"""Data layer: config validation, GLUE TSV / csv / jsonl loaders, tokenisation, bucketing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from ltp_compress.tasks.data import (
    CHUNK_BATCHES,
    DataConfig,
    DataError,
    SplitData,
    Example,
    TokenizedSplit,
    check_data_files,
    length_bucketed_batches,
    load_split,
    mean_tokens,
    resolve_paths,
    tokenize_split,
)
from ltp_compress.tasks.glue import TASK_NAMES, get_task

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data"


def write(path: Path, text: str, bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def glue(path: Path, **kw) -> DataConfig:
    return DataConfig(source="glue_dir", path=str(path), **kw)


# ----------------------------------------------------------------------------- tasks
def test_get_task_and_specs():
    assert TASK_NAMES == ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
    assert get_task("SST-2").name == "sst2"
    with pytest.raises(ValueError, match="valid tasks: cola, sst2"):
        get_task("imdb")
    mnli = get_task("mnli")
    assert mnli.label_names == ("entailment", "neutral", "contradiction")
    assert mnli.dev_keys == ("dev", "dev_mismatched")
    assert [mnli.report_name(s) for s in mnli.dev_keys] == ["mnli-m", "mnli-mm"]
    assert mnli.hub_split("dev_mismatched") == "validation_mismatched"
    assert mnli.tsv_file("dev") == "dev_matched.tsv"
    assert get_task("stsb").num_labels == 1 and get_task("stsb").main_metric == "pearson_spearman"
    assert get_task("mrpc").main_metric == "f1_acc" and get_task("cola").main_metric == "mcc"
    assert get_task("sst2").text_b is None and get_task("sst2").dev_keys == ("dev",)
    with pytest.raises(ValueError, match="no split"):
        get_task("sst2").tsv_file("dev_mismatched")
    hash(mnli)  # frozen + hashable


# ----------------------------------------------------------------------------- config
def test_config_validation(tmp_path):
    with pytest.raises(ValidationError, match="path is required"):
        DataConfig(source="glue_dir")
    with pytest.raises(ValidationError, match="text_a"):
        DataConfig(source="csv", path="x", columns={"label": "y"})
    with pytest.raises(ValidationError, match="label"):
        DataConfig(source="jsonl", path="x", columns={"text_a": "s"})
    with pytest.raises(ValidationError):
        DataConfig(source="csv", columns={"text_a": "s", "label": "y"})  # no path/files
    with pytest.raises(ValidationError):
        DataConfig(surce="hub")  # extra="forbid"
    with pytest.raises(ValidationError):
        DataConfig(max_seq_length=4)
    with pytest.raises(ValidationError):
        DataConfig(max_seq_length=1024)
    with pytest.raises(ValidationError):
        DataConfig(source="glue_dir", path="x", columns={"text_a": "s", "label": "y"})
    assert DataConfig().source == "hub" and DataConfig().max_seq_length == 128


def test_resolve_paths_and_check_files(tmp_path):
    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()
    write(tmp_path / "glue" / "train.tsv", "sentence\tlabel\ngood\t1\n")
    cfg = resolve_paths(DataConfig(source="glue_dir", path="../glue"), recipe_dir)
    assert Path(cfg.path) == (tmp_path / "glue").resolve()
    problems = check_data_files(cfg, get_task("sst2"))
    assert len(problems) == 1 and str((tmp_path / "glue" / "dev.tsv").resolve()) in problems[0]
    write(tmp_path / "glue" / "dev.tsv", "sentence\tlabel\nbad\t0\n")
    assert check_data_files(cfg, get_task("sst2")) == []
    # MNLI needs dev_matched / dev_mismatched
    probs = check_data_files(cfg, get_task("mnli"))
    assert any("dev_matched.tsv" in p for p in probs) and any("dev_mismatched.tsv" in p for p in probs)
    # missing folder
    bad = resolve_paths(DataConfig(source="glue_dir", path="nope"), recipe_dir)
    assert any("data folder not found" in p and "nope" in p for p in check_data_files(bad, get_task("sst2")))
    # csv explicit files, absolute path kept
    c = resolve_paths(DataConfig(source="csv", train_file="t.csv", dev_file=str(tmp_path / "d.csv"),
                                 columns={"text_a": "s", "label": "y"}), recipe_dir)
    assert c.train_file == str((recipe_dir / "t.csv").resolve())
    assert c.dev_file == str((tmp_path / "d.csv").resolve())
    probs = check_data_files(c, get_task("mrpc"))
    assert any("t.csv" in p for p in probs) and any("text_b" in p for p in probs)
    assert check_data_files(DataConfig(), get_task("sst2")) == []  # hub: nothing checked


# ----------------------------------------------------------------------------- GLUE TSV
def test_sst2_tsv_and_stray_quotes(tmp_path):
    write(tmp_path / "train.tsv",
          'sentence\tlabel\n" a quoted start\t1\nit \'s " odd " , really \t0\n')
    d = load_split(glue(tmp_path), get_task("sst2"), "train")
    assert [e.label for e in d.examples] == [1, 0]
    assert d.examples[0].text_a == '" a quoted start' and d.examples[0].text_b is None
    assert d.source == str(tmp_path / "train.tsv") and d.skipped == 0 and d.name == "train"


def test_wrong_field_count_error_mentions_file_and_line(tmp_path):
    f = write(tmp_path / "train.tsv", "sentence\tlabel\ngood movie\t1\nbad\tmovie\t0\nok\t1\n")
    with pytest.raises(DataError) as ei:
        load_split(glue(tmp_path), get_task("sst2"), "train")
    msg = str(ei.value)
    assert f"{f}:3:" in msg and "expected 2" in msg and "got 3" in msg


def test_skip_mode_counts_bad_rows(tmp_path):
    write(tmp_path / "train.tsv",
          "sentence\tlabel\n"
          "good movie\t1\n"      # line 2 ok
          "bad\tmovie\t0\n"      # line 3 wrong field count
          "   \t1\n"             # line 4 empty text
          "fine\tpositive\n"     # line 5 unparseable label
          "fine\t7\n"            # line 6 label out of range
          "\n"                   # blank line: ignored, not counted
          "last one\t0\n")       # line 8 ok
    cfg = glue(tmp_path, on_bad_row="skip")
    d = load_split(cfg, get_task("sst2"), "train")
    assert [e.text_a for e in d.examples] == ["good movie", "last one"]
    assert d.skipped == 4
    # in error mode each problem points at its own (1-based, header = 1) line
    for line, bad_row, text in [(4, "   \t1\n", "empty"), (5, "fine\tpositive\n", "positive"),
                                (6, "fine\t7\n", "out of range")]:
        write(tmp_path / "e" / "train.tsv", "sentence\tlabel\n" + "ok\t1\n" * (line - 2) + bad_row)
        with pytest.raises(DataError, match=rf"train.tsv:{line}: .*{text}"):
            load_split(glue(tmp_path / "e"), get_task("sst2"), "train")


def test_mrpc_bom_and_header_names(tmp_path):
    write(tmp_path / "train.tsv",
          "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
          "1\t702876\t702977\tAmrozi accused his brother .\tReferring to him , Amrozi accused .\n"
          "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's .\n",
          bom=True)
    d = load_split(glue(tmp_path), get_task("mrpc"), "train")
    assert len(d.examples) == 2
    assert d.examples[0] == Example("Amrozi accused his brother .", "Referring to him , Amrozi accused .", 1)
    assert d.examples[1].label == 0


def test_string_labels_qnli_rte_and_unknown_label(tmp_path):
    write(tmp_path / "qnli" / "dev.tsv",
          "index\tquestion\tsentence\tlabel\n"
          "0\tWhat came into force ?\tThe law came into force .\tentailment\n"
          "1\tWho ?\tNobody knows .\tnot_entailment\n")
    d = load_split(glue(tmp_path / "qnli"), get_task("qnli"), "dev")
    assert [(e.text_a, e.label) for e in d.examples] == [("What came into force ?", 0), ("Who ?", 1)]
    write(tmp_path / "rte" / "train.tsv",
          "index\tsentence1\tsentence2\tlabel\n"
          "0\tA dog runs .\tAn animal moves .\tentailment\n"
          "1\tA dog runs .\tA cat sleeps .\tnot_entailment\n"
          "2\tA dog runs .\tA cat sleeps .\tmaybe\n")
    with pytest.raises(DataError, match=r"train.tsv:4: .*unknown label 'maybe'"):
        load_split(glue(tmp_path / "rte"), get_task("rte"), "train")
    d = load_split(glue(tmp_path / "rte", on_bad_row="skip"), get_task("rte"), "train")
    assert [e.label for e in d.examples] == [0, 1] and d.skipped == 1
    assert d.examples[0].text_b == "An animal moves ."
    # WNLI uses integer labels
    write(tmp_path / "wnli" / "train.tsv",
          "index\tsentence1\tsentence2\tlabel\n0\tI stuck a pin .\tThe pin had a hole .\t1\n")
    assert load_split(glue(tmp_path / "wnli"), get_task("wnli"), "train").examples[0].label == 1


def test_cola_has_no_header(tmp_path):
    write(tmp_path / "train.tsv",
          "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
          "gj04\t0\t*\tThey drank the pub.\n"
          "gj04\t1\n")  # line 3: too few fields
    with pytest.raises(DataError, match=r"train.tsv:3: expected 4"):
        load_split(glue(tmp_path), get_task("cola"), "train")
    d = load_split(glue(tmp_path, on_bad_row="skip"), get_task("cola"), "train")
    assert [e.label for e in d.examples] == [1, 0] and d.skipped == 1
    assert d.examples[0].text_a.startswith("Our friends") and d.examples[1].text_a == "They drank the pub."


MNLI_TRAIN_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                     "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")
MNLI_DEV_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                   "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\t"
                   "label4\tlabel5\tgold_label\n")


def test_mnli_column_positions(tmp_path):
    write(tmp_path / "train.tsv", MNLI_TRAIN_HEADER +
          "0\t31193\t31193n\tgovernment\t( ( A ) )\t( B )\t(ROOT (S A))\t(ROOT (S B))\t"
          "Conceptually cream skimming has two dimensions .\tProduct and geography are what make it work .\t"
          "neutral\tneutral\n")
    write(tmp_path / "dev_matched.tsv", MNLI_DEV_HEADER +
          "0\t1\t1e\tfiction\t( A )\t( B )\t(ROOT A)\t(ROOT B)\tThe new rights are nice .\t"
          "Everyone likes them .\tneutral\tentailment\tneutral\tneutral\tneutral\tcontradiction\n")
    write(tmp_path / "dev_mismatched.tsv", MNLI_DEV_HEADER +
          "0\t1\t1e\tletters\t( A )\t( B )\t(ROOT A)\t(ROOT B)\tYour gift is appreciated .\t"
          "Hundreds benefit .\tentailment\tentailment\tentailment\tentailment\tentailment\tentailment\n")
    task = get_task("mnli")
    cfg = glue(tmp_path)
    assert check_data_files(cfg, task) == []
    tr = load_split(cfg, task, "train")
    assert tr.examples == [Example("Conceptually cream skimming has two dimensions .",
                                   "Product and geography are what make it work .", 1)]
    dm = load_split(cfg, task, "dev")
    assert dm.examples[0].text_a == "The new rights are nice ." and dm.examples[0].label == 2  # gold_label
    dmm = load_split(cfg, task, "dev_mismatched")
    assert dmm.examples[0].text_b == "Hundreds benefit ." and dmm.examples[0].label == 0
    assert dmm.source.endswith("dev_mismatched.tsv")


def test_stsb_float_labels_and_qqp(tmp_path):
    write(tmp_path / "stsb" / "dev.tsv",
          "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
          "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hard hat is dancing.\t"
          "A man wearing a hard hat is dancing.\t5.000\n"
          "1\tmain-captions\tMSRvid\t2012test\t0002\tnone\tnone\tA young child is riding a horse.\t"
          "A child is riding a horse.\t4.750\n")
    d = load_split(glue(tmp_path / "stsb"), get_task("stsb"), "dev")
    assert [e.label for e in d.examples] == [5.0, 4.75] and isinstance(d.examples[0].label, float)
    write(tmp_path / "qqp" / "train.tsv",
          "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
          "133273\t213221\t213222\tHow is the life of a math student?\tWhich is the best book?\t0\n"
          "402555\t536040\n")  # truncated row (exists in the real QQP files)
    d = load_split(glue(tmp_path / "qqp", on_bad_row="skip"), get_task("qqp"), "train")
    assert len(d.examples) == 1 and d.skipped == 1 and d.examples[0].text_b == "Which is the best book?"


def test_missing_file_and_empty_split(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_split(glue(tmp_path), get_task("sst2"), "dev")
    write(tmp_path / "dev.tsv", "sentence\tlabel\n")
    with pytest.raises(DataError, match="no usable examples"):
        load_split(glue(tmp_path), get_task("sst2"), "dev")
    write(tmp_path / "train.tsv", "sentence\tlabel\nx\t1\n")
    with pytest.raises(ValueError, match="no split"):
        load_split(glue(tmp_path), get_task("sst2"), "dev_mismatched")


def test_seeded_subset(tmp_path):
    rows = "".join(f"sentence number {i}\t{i % 2}\n" for i in range(100))
    write(tmp_path / "train.tsv", "sentence\tlabel\n" + rows)
    write(tmp_path / "dev.tsv", "sentence\tlabel\n" + rows)
    cfg = glue(tmp_path, max_train_examples=10, max_dev_examples=1000)
    a = load_split(cfg, get_task("sst2"), "train", seed=1)
    b = load_split(cfg, get_task("sst2"), "train", seed=1)
    c = load_split(cfg, get_task("sst2"), "train", seed=2)
    ta = [e.text_a for e in a.examples]
    assert len(ta) == 10 and ta == [e.text_a for e in b.examples]
    assert ta != [e.text_a for e in c.examples]
    nums = [int(t.split()[-1]) for t in ta]
    assert nums == sorted(nums)  # file order kept
    assert len(load_split(cfg, get_task("sst2"), "dev").examples) == 100  # cap above size -> all


# ----------------------------------------------------------------------------- csv / jsonl
def test_csv_with_column_mapping(tmp_path):
    write(tmp_path / "train.csv",
          'premise,hypothesis,gold,extra\n'
          '"A man, tall, walks.",A person walks.,entailment,x\n'
          '"He said ""hi"".",Nobody spoke.,2,y\n'
          'Too,few\n')
    write(tmp_path / "dev.csv", 'premise,hypothesis,gold,extra\nA.,B.,neutral,z\n')
    cols = {"text_a": "premise", "text_b": "hypothesis", "label": "gold"}
    cfg = DataConfig(source="csv", path=str(tmp_path), columns=cols)
    task = get_task("mnli")
    with pytest.raises(DataError, match=r"train.csv:4: expected 4 fields"):
        load_split(cfg, task, "train")
    d = load_split(cfg.model_copy(update={"on_bad_row": "skip"}), task, "train")
    assert d.examples == [Example("A man, tall, walks.", "A person walks.", 0),
                          Example('He said "hi".', "Nobody spoke.", 2)]
    assert d.skipped == 1
    assert load_split(cfg, task, "dev").examples[0].label == 1
    # missing mapped column -> clear error naming the header
    bad = DataConfig(source="csv", path=str(tmp_path), columns={**cols, "label": "nope"})
    with pytest.raises(DataError, match="'nope'"):
        load_split(bad, task, "train")
    # .tsv extension under source csv -> tab separated, explicit files
    f = write(tmp_path / "x" / "my.tsv", "text\ty\nnice film\tpositive\nbad film\t0\n")
    cfg2 = DataConfig(source="csv", train_file=str(f), columns={"text_a": "text", "label": "y"})
    d2 = load_split(cfg2, get_task("sst2"), "train")
    assert [(e.text_a, e.label) for e in d2.examples] == [("nice film", 1), ("bad film", 0)]
    with pytest.raises(DataError, match="dev_file"):
        load_split(cfg2, get_task("sst2"), "dev")


def test_jsonl_with_column_mapping(tmp_path):
    lines = [
        json.dumps({"q": "Is it?", "s": "It is.", "y": 0}),
        json.dumps({"q": "Is it?", "s": "It is.", "y": "not_entailment"}),
        "{not json",
        json.dumps({"q": "Is it?", "y": 1}),  # missing text_b
        "",
        json.dumps({"q": "Why?", "s": "Because.", "y": 1.0}),
    ]
    f = write(tmp_path / "train.jsonl", "\n".join(lines) + "\n")
    cols = {"text_a": "q", "text_b": "s", "label": "y"}
    cfg = DataConfig(source="jsonl", path=str(tmp_path), columns=cols)
    with pytest.raises(DataError, match=rf"{f}:3: invalid JSON"):
        load_split(cfg, get_task("qnli"), "train")
    d = load_split(cfg.model_copy(update={"on_bad_row": "skip"}), get_task("qnli"), "train")
    assert [e.label for e in d.examples] == [0, 1, 1] and d.skipped == 2
    # regression via jsonl
    g = write(tmp_path / "sts" / "dev.jsonl", json.dumps({"a": "x y", "b": "y x", "score": "3.2"}) + "\n")
    cfg3 = DataConfig(source="jsonl", dev_file=str(g), columns={"text_a": "a", "text_b": "b", "label": "score"})
    assert load_split(cfg3, get_task("stsb"), "dev").examples[0].label == pytest.approx(3.2)


def test_hub_offline_error(monkeypatch):
    import datasets

    def boom(*a, **k):
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(DataError, match="glue_dir"):
        load_split(DataConfig(), get_task("sst2"), "dev")


def test_hub_rows_are_mapped(monkeypatch):
    import datasets

    calls = []

    def fake(name, config, split):
        calls.append((name, config, split))
        return [{"premise": "p1", "hypothesis": "h1", "label": 2, "idx": 0},
                {"premise": "p2", "hypothesis": "h2", "label": -1, "idx": 1}]  # -1 = unlabeled

    monkeypatch.setattr(datasets, "load_dataset", fake)
    d = load_split(DataConfig(on_bad_row="skip"), get_task("mnli"), "dev_mismatched")
    assert calls == [("glue", "mnli", "validation_mismatched")]
    assert d.examples == [Example("p1", "h1", 2)] and d.skipped == 1 and "glue/mnli" in d.source


# ----------------------------------------------------------------------------- tokenizer
WORDS = ("the a movie film is was good bad great not very it 's , . ? really fun boring "
         "man walks person cat sat on mat").split()


@pytest.fixture
def tiny_tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tok = BertTokenizerFast(vocab=str(vocab))  # transformers 5: BertTokenizer is tokenizers-backed
    assert tok.is_fast and len(tok) == 5 + len(WORDS)
    return tok


def test_tokenize_single_and_pair(tiny_tokenizer):
    tok = tiny_tokenizer
    single = SplitData("dev", [Example("the movie is good .", None, 1),
                               Example("bad", None, 0),
                               Example("a very very very very very very very very very very boring film", None, 0)],
                       0, "mem")
    ts = tokenize_split(single, tok, max_seq_length=8)
    cls, sep = tok.cls_token_id, tok.sep_token_id
    assert row_ids(ts, 0) == [cls] + tok.convert_tokens_to_ids("the movie is good .".split()) + [sep]
    assert row_ids(ts, 1) == [cls, tok.convert_tokens_to_ids("bad"), sep]
    assert len(row_ids(ts, 2)) == 8 and row_ids(ts, 2)[-1] == sep  # truncated to max_seq_length
    assert ts.truncated == 1
    assert row_types(ts, 0) == [0] * 7 and ts.labels.tolist() == [1, 0, 0] and ts.num_labels == 2
    assert ts.ids.dtype == np.int32 and ts.types.dtype == np.int8 and ts.labels.dtype == np.int64
    assert tok.unk_token_id not in ts.ids.tolist()
    assert mean_tokens(ts) == pytest.approx((7 + 3 + 8) / 3)

    pair = SplitData("train", [Example("a man walks .", "a person walks .", 0)], 0, "mem")
    tp = tokenize_split(pair, tok, max_seq_length=64, num_labels=3)
    assert row_types(tp, 0) == [0] * 6 + [1] * 5 and tp.num_labels == 3
    assert row_ids(tp, 0).count(sep) == 2

    reg = SplitData("dev", [Example("a cat", "the cat", 4.5)], 0, "mem")
    tr = tokenize_split(reg, tok, 16)
    assert tr.num_labels == 1 and tr.labels.dtype == np.float64
    (b,) = length_bucketed_batches(tr, 4, shuffle=False, seed=0, pad_token_id=tok.pad_token_id)
    assert b.labels.dtype == torch.float32 and b.labels.tolist() == [4.5]


def row_ids(ts: TokenizedSplit, i: int) -> list[int]:
    return ts.ids[ts.offsets[i]:ts.offsets[i + 1]].tolist()


def row_types(ts: TokenizedSplit, i: int) -> list[int]:
    return ts.types[ts.offsets[i]:ts.offsets[i + 1]].tolist()


# ----------------------------------------------------------------------------- bucketing
def synthetic(n=237, seed=0, num_labels=2) -> TokenizedSplit:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 120, size=n)
    ids = [[2] + list(rng.integers(5, 30, size=L - 2)) + [3] for L in lengths]
    tt = [[0] * (len(r) // 2) + [1] * (len(r) - len(r) // 2) for r in ids]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    labels = rng.integers(0, num_labels, size=n).astype(np.int64)
    return TokenizedSplit("train", np.concatenate(ids).astype(np.int32), offsets,
                          np.concatenate(tt).astype(np.int8), labels, num_labels)


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_padded_to_own_max_and_cover_all(shuffle):
    ts = synthetic()
    batch_size = 4  # 237 rows: two chunks of CHUNK_BATCHES batches when shuffled
    assert len(ts) > CHUNK_BATCHES * batch_size
    batches = length_bucketed_batches(ts, batch_size, shuffle=shuffle, seed=3, pad_token_id=0)
    seen = torch.cat([b.index for b in batches]).tolist()
    assert sorted(seen) == list(range(len(ts)))  # every row exactly once
    assert len(batches) == -(-len(ts) // batch_size)
    max_len = int(ts.lengths.max())
    total_cells = 0
    for b in batches:
        rows = b.index.tolist()
        lens = [len(row_ids(ts, i)) for i in rows]
        assert b.input_ids.shape == (len(rows), max(lens))  # padded to its own longest row
        assert b.input_ids.dtype == b.attention_mask.dtype == b.token_type_ids.dtype == torch.long
        assert b.labels.dtype == torch.long and b.index.dtype == torch.long
        assert b.attention_mask.sum(1).tolist() == lens
        for j, i in enumerate(rows):
            n = lens[j]
            assert b.input_ids[j, :n].tolist() == row_ids(ts, i)
            assert b.token_type_ids[j, :n].tolist() == row_types(ts, i)
            assert (b.input_ids[j, n:] == 0).all() and (b.attention_mask[j, n:] == 0).all()
            assert b.labels[j].item() == ts.labels[i]
        total_cells += b.input_ids.numel()
    # bucketing keeps padding far below pad-to-longest
    assert total_cells < 0.8 * len(ts) * max_len
    if not shuffle:  # evaluation order: longest first, non-increasing widths
        widths = [b.input_ids.shape[1] for b in batches]
        assert widths == sorted(widths, reverse=True)


def test_batches_seeded():
    ts = synthetic()
    def key(bs):
        return [b.index.tolist() for b in bs]
    a = length_bucketed_batches(ts, 8, shuffle=True, seed=7, pad_token_id=0)
    b = length_bucketed_batches(ts, 8, shuffle=True, seed=7, pad_token_id=0)
    c = length_bucketed_batches(ts, 8, shuffle=True, seed=8, pad_token_id=0)
    assert key(a) == key(b) and key(a) != key(c)
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    e1 = length_bucketed_batches(ts, 8, shuffle=False, seed=1, pad_token_id=0)
    e2 = length_bucketed_batches(ts, 8, shuffle=False, seed=2, pad_token_id=0)
    assert key(e1) == key(e2)  # no shuffle -> seed irrelevant
    empty = TokenizedSplit("x", np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.int8), np.zeros(0, np.int64), 2)
    assert length_bucketed_batches(empty, 8, shuffle=True, seed=0, pad_token_id=0) == []
    b0 = length_bucketed_batches(ts, 8, shuffle=False, seed=0, pad_token_id=99)[0]
    assert (b0.input_ids[b0.attention_mask == 0] == 99).all()


# ----------------------------------------------------------------------------- shipped data
def test_shipped_sst2_demo_loads(tiny_tokenizer):
    task = get_task("sst2")
    cfg = resolve_paths(DataConfig(source="glue_dir", path="data/sst2_demo"), REPO)
    assert check_data_files(cfg, task) == []
    train = load_split(cfg, task, "train")
    dev = load_split(cfg, task, "dev")
    assert len(train.examples) == 4000 and len(dev.examples) == 872
    assert train.skipped == 0 and dev.skipped == 0
    for split in (train, dev):
        labels = {e.label for e in split.examples}
        assert labels == {0, 1}
        assert all(e.text_a.strip() and e.text_b is None for e in split.examples)
    ts = tokenize_split(dev, tiny_tokenizer, cfg.max_seq_length, num_labels=task.num_labels)
    assert len(ts) == 872 and int(ts.lengths.max()) <= 128
    batches = length_bucketed_batches(ts, 32, shuffle=False, seed=0, pad_token_id=tiny_tokenizer.pad_token_id)
    assert sum(len(b) for b in batches) == 872


def test_shipped_mrpc_tiny_loads():
    task = get_task("mrpc")
    cfg = DataConfig(source="glue_dir", path=str(SHIPPED / "mrpc_tiny"))
    assert len(load_split(cfg, task, "train").examples) == 200
    dev = load_split(cfg, task, "dev")
    assert len(dev.examples) == 100 and all(e.text_b for e in dev.examples)
    total = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert total < 1_000_000
