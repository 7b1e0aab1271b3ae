"""The flow's typed parameters and what makes a scheduled run re-train (no server needed)."""
from __future__ import annotations

import pytest
from huggingface_hub import constants
from huggingface_hub.file_download import repo_folder_name

from flows.sft import sft
from sft_pipeline.config import ConfigError, DataConfig, load_config, parse_overrides
from sft_pipeline.hub import dataset_commit
from sft_pipeline.chat_data import source_fingerprint


def test_override_mapping_means_the_same_as_cli_set():
    cli = ["lora.r=4", "lora.target_modules=[q_proj, v_proj]", "data.test_subset.count=10", "format.system_message=null"]
    assert parse_overrides(cli) == {"lora.r": 4, "lora.target_modules": ["q_proj", "v_proj"],
                                    "data.test_subset.count": 10, "format.system_message": None}
    assert load_config("tiny", parse_overrides(cli)) == load_config("tiny", cli)
    assert load_config("tiny", {"lora.r": "4"}).lora.r == 4  # a JSON string is coerced like YAML would be
    with pytest.raises(ConfigError, match=r"lora\.r"):
        load_config("tiny", {"lora.r": 0})


def test_secrets_are_block_names_never_values():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", {"auth.hf_token": "hf_secret_value"})
    assert "unknown key 'auth.hf_token'" in str(err.value) and "hf_secret_value" not in str(err.value)
    assert load_config("tiny", {"auth.hf_token_block": "team-hf-token"}).auth.hf_token_block == "team-hf-token"


def test_flow_parameters_are_typed():
    props = sft.parameters.model_dump()["properties"]
    assert props["recipe"]["enum"] == ["mistral-7b-qlora", "smollm2-135m", "tiny", "zephyr-7b-qlora"]
    assert sft.validate_parameters({"overrides": {"lora.r": 4}})["recipe"] == "tiny"
    with pytest.raises(Exception, match="recipe"):
        sft.validate_parameters({"recipe": "tinny"})


def test_hub_data_identity_is_the_commit_its_revision_points_to(tmp_path, monkeypatch):
    """Offline (HF_HUB_OFFLINE=1 in the tests) the commit comes from the local hub cache's refs."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    data = DataConfig(source="hub", dataset="HuggingFaceH4/ultrachat_200k")
    refs = tmp_path / repo_folder_name(repo_id=data.dataset, repo_type="dataset") / "refs"
    assert dataset_commit(data.dataset, None) is None  # nothing cached: the revision name alone identifies it
    unknown = source_fingerprint(data)
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    assert dataset_commit(data.dataset, None) == "a" * 40
    first = source_fingerprint(data)
    (refs / "main").write_text("b" * 40)  # a new commit on main was downloaded: the data stage must re-run
    assert len({unknown, first, source_fingerprint(data)}) == 3
    pinned = DataConfig(source="hub", dataset=data.dataset, revision="c" * 40)
    assert dataset_commit(pinned.dataset, pinned.revision) == "c" * 40
