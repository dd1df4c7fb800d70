"""A --model resolved once (`tegaki.load.ModelSource`): its folder, config and tokenizer, and the
folders its chat template may be in, for a run folder, a transformers folder and a hub id."""

from __future__ import annotations

import pytest
import torch
from finetune_models import make_run
from serve_models import write_model_folder

from tegaki import load
from tegaki.load import ModelSource, from_pretrained, tokenizer_for

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("load") / "tiny-ja", train_steps=0)


def test_a_transformers_folder_carries_its_config_tokenizer_and_template_folders(hf_folder):
    source = ModelSource(str(hf_folder))
    model = source.load()
    assert source.folder == hf_folder and not source.is_run and source.short_name == "tiny-ja"
    assert source.config == model.config  # read from config.json alone, before any weights
    assert source.tokenizer is source.tokenizer  # loaded once
    assert source.tokenizer.encode("吾輩") == tokenizer_for(hf_folder).encode("吾輩")
    assert source.template_folders() == [hf_folder, hf_folder / "tokenizer"]
    assert torch.equal(model.wte.weight, from_pretrained(hf_folder).wte.weight)


def test_a_run_folder_is_a_run(tmp_path):
    run = make_run(tmp_path / "run")
    source = ModelSource(run)
    assert source.is_run and source.short_name == "run"
    assert source.config == source.load().config
    assert source.tokenizer.encode("the cat") == tokenizer_for(run).encode("the cat")


def test_a_hub_id_downloads_its_tokenizer_once_and_finds_its_template_there(hf_folder, monkeypatch):
    """The tokenizer and the chat template come from one download of the tokenizer's files."""
    downloads = []

    def fake_download(repo_id, patterns):
        downloads.append((repo_id, tuple(patterns)))
        return hf_folder

    monkeypatch.setattr(load, "_download", fake_download)
    source = ModelSource("someone/tiny-ja")
    assert source.folder is None and source.short_name == "someone/tiny-ja"
    assert source.template_folders() == [hf_folder]
    assert source.tokenizer.encode("吾輩") == tokenizer_for(hf_folder).encode("吾輩")
    assert downloads == [("someone/tiny-ja", tuple(load._TOKENIZER_FILES))]
    assert "chat_template.jinja" in load._TOKENIZER_FILES
    assert ModelSource("gpt2").template_folders() == [] and ModelSource("gpt2").tokenizer.vocab_size == 50257
