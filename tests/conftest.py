"""Shared fixtures: tiny BERT / RoBERTa models (2 layers, d=32) built from configs, with a tiny
WordPiece tokenizer whose vocabulary comes from the shipped demo data. CPU only."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "data" / "sst2_demo"
MRPC_TINY = REPO / "data" / "mrpc_tiny"


def _vocab_words(limit: int = 600) -> list[str]:
    counts = collections.Counter()
    for f in (DEMO_DATA / "train.tsv", MRPC_TINY / "train.tsv"):
        for line in f.read_text(encoding="utf-8-sig").splitlines()[1:]:
            counts.update(re.findall(r"[a-z]+", line.lower()))
    return [w for w, _ in counts.most_common(limit)]


def build_tiny_model(folder: Path, model_type: str = "bert", num_labels: int = 2, seed: int = 0, num_layers: int = 2) -> Path:
    """Save a tiny random *ForSequenceClassification model + tokenizer to `folder`."""
    import torch
    from transformers import (BertConfig, BertForSequenceClassification, BertTokenizerFast,
                              RobertaConfig, RobertaForSequenceClassification)

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    vocab = specials + list(".,!?'-") + letters + [w for w in _vocab_words() if w not in letters]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)  # transformers 5: vocab=, not vocab_file=
    common = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=160, num_labels=num_labels)
    torch.manual_seed(seed)
    if model_type == "bert":
        model = BertForSequenceClassification(BertConfig(pad_token_id=0, **common))
    else:
        # RoBERTa with the same WordPiece tokenizer: pad id 0 is its padding_idx, positions from 1
        model = RobertaForSequenceClassification(RobertaConfig(pad_token_id=0, bos_token_id=2, eos_token_id=3, type_vocab_size=1, **common))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_bert"), "bert")


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_roberta"), "roberta")


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
