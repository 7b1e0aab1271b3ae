"""Up-front checks of the machine against the run (before any download): each a one-line exit 2 naming what is
missing and how much. The GPU and the disk are faked here; the arithmetic and the messages are the real ones."""
from __future__ import annotations

import pytest

import sft_pipeline.models
from sft_pipeline import preflight, secrets
from sft_pipeline.config import load_config
from sft_pipeline.errors import ConfigError
from tests.conftest import cli

GIB = 2**30
SEVEN_B = ["model.source=build", "model.name=mistral-7b", "format.max_length=2048", "training.device=auto"]


@pytest.fixture
def gpu(monkeypatch):
    """A fake CUDA card: set .free (bytes) and .bf16."""

    class Card:
        free, bf16 = 80 * GIB, True

    card = Card()
    monkeypatch.setattr(sft_pipeline.models, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(preflight, "_cuda_free_bytes", lambda: card.free)
    monkeypatch.setattr(preflight, "_bf16_supported", lambda: card.bf16)
    return card


def test_a_7b_in_4bit_fits_an_empty_80gb_card_and_not_a_6gb_one(gpu, tmp_path):
    cfg = load_config("tiny", SEVEN_B)
    need = preflight.gpu_need_bytes(cfg, preflight.model_config(cfg))
    assert 4 * GIB < need < 8 * GIB  # 7.2B parameters in 4-bit (~4 GiB) + one 2048-token sequence
    preflight.check(cfg, tmp_path)
    gpu.free = 3 * GIB
    with pytest.raises(ConfigError) as err:
        preflight.check(cfg, tmp_path)
    msg = str(err.value)
    assert "format.max_length=2048" in msg and "GiB of GPU memory" in msg and "3.0 GiB free" in msg, msg
    assert "\n" not in msg


def test_bf16_on_a_card_without_it(gpu, tmp_path):
    gpu.bf16 = False
    with pytest.raises(ConfigError, match="quantization.compute_dtype=bfloat16 but this GPU has no bf16"):
        preflight.check(load_config("tiny", ["quantization.compute_dtype=bfloat16"]), tmp_path)
    preflight.check(load_config("tiny", ["quantization.compute_dtype=auto"]), tmp_path)  # auto picks fp16 there


def test_a_store_on_a_disk_too_small(monkeypatch, tmp_path):
    cfg = load_config("tiny", SEVEN_B[:2])
    parts = preflight.disk_need_bytes(cfg, preflight.model_config(cfg))
    assert 13 * GIB < parts["model"] < 16 * GIB  # the 7B in bf16, written once into the store
    monkeypatch.setattr(preflight, "_disk_free", lambda path: 2 * GIB)
    with pytest.raises(ConfigError) as err:
        preflight.check(cfg, tmp_path / "store")
    assert f"({tmp_path / 'store'}) has 2.0 GiB free" in str(err.value) and "model 1" in str(err.value)


def test_a_gated_hub_model_without_a_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(secrets, "_block", lambda name: None)
    cfg = load_config("mistral-7b-qlora", ["model.requires_token=true"])
    preflight.check(cfg, tmp_path)  # the CLI, before Prefect: a Secret block may still hold it
    with pytest.raises(ConfigError, match="is gated and needs a Hugging Face token: set the HF_TOKEN"):
        preflight.check(cfg, tmp_path, blocks=True)
    monkeypatch.setenv("HF_TOKEN", "hf_canary_value_123")
    preflight.check(cfg, tmp_path, blocks=True)


def test_cli_refuses_before_any_stage_with_one_line(tmp_path):
    proc = cli("run", "--store", str(tmp_path / "store"), "--set", "training.device=cuda")
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "training.device=cuda" in line and "no usable CUDA device" in line
    assert not (tmp_path / "store").exists()  # nothing written


def test_what_the_checks_measured_is_kept_for_later_commands(tmp_path):
    """~15 s here. The chat template's overhead (a tokenizer) and the model's sizes (transformers' config) are
    measured once and kept in the store: a later check in a fresh process imports neither transformers nor torch and
    still refuses a max_length the template fills. plan's checks (remember=False) and a failed check write
    nothing; a memo that was changed by hand is not believed."""
    import subprocess
    import sys

    from sft_pipeline.store import Store
    from tests.conftest import ROOT

    store = tmp_path / "store"
    preflight.check(load_config("tiny"), store, remember=False)  # plan
    assert not store.exists()
    with pytest.raises(ConfigError):
        preflight.check(load_config("tiny", ["format.max_length=18"]), store)
    assert not store.exists()
    preflight.check(load_config("tiny"), store)
    memos = sorted((store / preflight.MEMO).iterdir())
    kept = [Store(store).read_memo(preflight.MEMO, m.name)[0] for m in memos]
    assert sorted(next(iter(k["what"])) for k in kept) == ["overhead", "shape"]
    assert [k["value"] for k in kept if "overhead" in k["what"]][0] > 18  # the measured overhead, in tokens

    code = ("import sys\nfrom sft_pipeline import preflight\nfrom sft_pipeline.config import load_config\n"
            "preflight.check(load_config('tiny'), sys.argv[1])\n"
            "try:\n    preflight.check(load_config('tiny', ['format.max_length=18']), sys.argv[1])\n"
            "except Exception as e:\n    print(e)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    child = subprocess.run([sys.executable, "-c", code, str(store)], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    assert "not longer than the chat template's own overhead" in child.stdout, child.stdout
    assert child.stdout.strip().endswith("[]"), child.stdout  # nothing heavy imported

    overhead = next(m for m, k in zip(memos, kept) if "overhead" in k["what"])
    (overhead / "memo.json").write_text('{"what": {}, "value": 1}')  # changed by hand: measured again
    with pytest.raises(ConfigError, match="own overhead"):
        preflight.check(load_config("tiny", ["format.max_length=18"]), store)
