"""The training loop on the tiny model: loss falls, callbacks and cancel, optimizers,
schedules, EMA, non-finite stop, exact resume (in process)."""

import math

import pytest
import torch

from trainer.lora.io import load_lora, read_lora_file
from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel
from trainer.train.checkpoint import list_checkpoints, load_checkpoint
from trainer.train.config import TrainConfig
from trainer.train.loop import NonFiniteLossError, train
from trainer.train.objective import evaluate
from trainer.train.synthetic import SyntheticTalkingDataset


def _model():
    torch.manual_seed(0)
    return WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)


def _data(seed=0, **kw):
    return SyntheticTalkingDataset(text_len=64, seed=seed, **kw)


def _cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), max_train_steps=6, lora_rank=4, lora_alpha=4,
                learning_rate=1e-3, checkpoint_step_interval=0, tensorboard=False)
    base.update(kw)
    return TrainConfig.from_dict(base)


def _inputs():
    g = torch.Generator().manual_seed(3)
    return dict(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g), timestep=torch.tensor([400.0]),
                encoder_hidden_states=torch.randn(1, 64, 32, generator=g),
                audio_embeds=torch.randn(1, 25, 48, 8, generator=g),
                reference_latents=torch.randn(1, 16, 1, 8, 8, generator=g))


def test_loss_falls_and_lora_changes_output(tmp_path):
    data = _data()
    cfg = _cfg(tmp_path, max_train_steps=40, lora_rank=8, lora_alpha=8, flow_schedule_shift=1.0,
               caption_dropout_probability=0.0, audio_dropout_probability=0.0, eval_step_interval=20)
    model = _model()
    with torch.no_grad():
        before_out = model(**_inputs()).sample
    before = evaluate(model, data, cfg, torch.device("cpu"))
    result = train(model, data, cfg, eval_dataset=data)
    after = result.eval_history[-1][1]
    assert [s for s, _ in result.eval_history] == [20, 40]
    assert after < 0.9 * before, (before, result.eval_history)
    first, last = result.loss_history[:10], result.loss_history[-10:]
    assert sum(v for _, v in last) < sum(v for _, v in first)
    with torch.no_grad():
        assert (model(**_inputs()).sample - before_out).abs().max() > 1e-3
    # the saved ComfyUI file reproduces the trained adapter exactly
    fresh = _model()
    load_lora(fresh, result.lora_path)
    with torch.no_grad():
        assert torch.equal(fresh(**_inputs()).sample, model(**_inputs()).sample)
    meta = read_lora_file(result.lora_path).metadata
    assert '"max_train_steps": 40' in meta["wan_s2v_training_config"]
    log_lines = result.log_path.read_text().strip().splitlines()
    assert len(log_lines) == 40 and all(k in log_lines[0] for k in ("loss", "lr", "grad_norm", "step_time", "memory"))
    print(f"eval loss {before:.4f} -> {after:.4f}")


def test_progress_and_cancel_write_a_checkpoint(tmp_path):
    calls = []
    result = train(_model(), _data(), _cfg(tmp_path, max_train_steps=50),
                   progress=lambda step, loss, lr, eta: calls.append((step, loss, lr, eta)),
                   should_stop=lambda: len(calls) >= 3)
    assert result.stopped and result.global_step == 3 and [c[0] for c in calls] == [1, 2, 3]
    assert all(math.isfinite(c[1]) and c[2] == 1e-3 and c[3] >= 0 for c in calls)
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [3]
    assert result.lora_path.is_file()


def test_checkpoint_interval_and_total_limit(tmp_path):
    train(_model(), _data(), _cfg(tmp_path, max_train_steps=8, checkpoint_step_interval=2, checkpoints_total_limit=2))
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [6, 8]


class _PoisonedAfter(torch.utils.data.Dataset):
    """A real dataset whose items turn NaN after `good` reads (a corrupt cache entry)."""

    def __init__(self, inner, good):
        self.inner, self.good, self.reads = inner, good, 0

    def __len__(self):
        return len(self.inner)

    def bucket_of(self, i):
        return self.inner.bucket_of(i)

    def __getitem__(self, i):
        self.reads += 1
        item = self.inner[i]
        if self.reads > self.good:
            item["latents"] = torch.full_like(item["latents"], float("nan"))
        return item


def test_non_finite_loss_stops_after_saving_the_good_state(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4.*last good state \(step 3\) was saved"):
        train(_model(), _PoisonedAfter(_data(), good=3), _cfg(tmp_path, max_train_steps=10))
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [s for s, _ in ckpts] == [3]
    state = load_checkpoint(ckpts[0][1])
    assert all(torch.isfinite(t).all() for t in state["lora"].values())
    # the LoRA so far, under a name of its own (the run did not finish)
    assert (tmp_path / "run" / "wan_s2v_lora_partial_step3.safetensors").is_file()
    assert not (tmp_path / "run" / "wan_s2v_lora.safetensors").exists()


def _optimizer_available(name):
    if name in ("adamw8bit", "lion8bit_paged"):
        return pytest.importorskip("bitsandbytes")
    if name == "prodigy":
        return pytest.importorskip("prodigyopt")
    return True


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "lion", "lion8bit_paged", "prodigy"])
def test_optimizers_step(tmp_path, name):
    _optimizer_available(name)
    model = _model()
    result = train(model, _data(), _cfg(tmp_path, max_train_steps=2, optimizer=name, lora_init="gaussian",
                                        learning_rate=1.0 if name == "prodigy" else 1e-3))
    b = [v for k, v in result.lora_state.items() if "lora_B" in k]
    assert all(torch.isfinite(t).all() for t in b) and any(t.abs().max() > 0 for t in b)


@pytest.mark.parametrize(
    "schedule,check",
    [
        ("constant", lambda lrs: all(v == 1e-3 for v in lrs)),
        ("constant_with_warmup", lambda lrs: lrs[:3] == pytest.approx([0, 1e-3 / 3, 2e-3 / 3]) and lrs[5] == 1e-3),
        ("linear", lambda lrs: lrs[3] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-3 / 7)),
        ("cosine", lambda lrs: lrs[3] == pytest.approx(1e-3) and lrs[-1] < 0.06e-3 and lrs == sorted(lrs[:4]) + lrs[4:]),
        ("polynomial", lambda lrs: lrs[3] == pytest.approx(1e-3) and lrs[-1] < lrs[5] < lrs[4]),
    ],
)
def test_lr_schedules(tmp_path, schedule, check):
    lrs = []
    train(_model(), _data(), _cfg(tmp_path, max_train_steps=10, lr_scheduler=schedule, lr_warmup_steps=3),
          on_log=lambda r: lrs.append(r["lr"]))
    assert len(lrs) == 10 and check(lrs), lrs


def test_grad_clipping_and_accumulation(tmp_path):
    norms = []
    data = _data()
    result = train(_model(), data, _cfg(tmp_path, max_train_steps=3, gradient_accumulation_steps=2,
                                        grad_clip_mode="value", max_grad_value=1e-4),
                   on_log=lambda r: norms.append(r["grad_norm"]))
    assert result.global_step == 3 and len(norms) == 3
    # value clipping: each update of AdamW is bounded anyway; check the data position instead
    state = load_checkpoint(result.checkpoint) if result.checkpoint else None
    assert state is None  # no interval, no stop: no checkpoint
    cfg = _cfg(tmp_path, max_train_steps=2, gradient_accumulation_steps=2, checkpoint_step_interval=2)
    second = train(_model(), data, cfg)  # a new run: a folder of its own (run_2)
    ckpt = load_checkpoint(second.checkpoint)
    # 4 items per epoch (2 sources x 2 windows), batch 1: 2 steps x 2 micro-batches = one epoch
    assert ckpt["training_state"]["data"] == {"epoch": 0, "position": 4}


def test_ema_weights_are_saved(tmp_path):
    model = _model()
    result = train(model, _data(), _cfg(tmp_path, max_train_steps=4, use_ema=True, ema_decay=0.5,
                                        ema_update_interval=2, lora_init="gaussian"))
    raw = {k.replace(".default.weight", ".weight"): p for k, p in model.named_parameters() if "lora_" in k}
    assert raw.keys() == result.lora_state.keys()
    assert any(not torch.equal(raw[k], result.lora_state[k]) for k in raw)
    ckpt_free = read_lora_file(result.lora_path).state
    assert all(torch.equal(ckpt_free[k], result.lora_state[k]) for k in ckpt_free)


def test_resume_in_process_matches_uninterrupted(tmp_path):
    """Stop at step 4 of 8, resume from 'latest': identical final LoRA, with every RNG
    consumer switched on (LoRA dropout, caption/audio dropout, motion, random reference, EMA)."""
    settings = dict(max_train_steps=8, lora_dropout=0.1, caption_dropout_probability=0.3,
                    audio_dropout_probability=0.3, motion_context_probability=0.5, reference_frame="random",
                    use_ema=True, ema_decay=0.9, lr_scheduler="cosine", lr_warmup_steps=2,
                    flow_weighting_scheme="beta", checkpoint_step_interval=3)
    full = train(_model(), _data(), _cfg(tmp_path / "a", **settings))
    steps = []
    part = train(_model(), _data(), _cfg(tmp_path / "b", **settings), should_stop=lambda: len(steps) >= 4,
                 progress=lambda *a: steps.append(a[0]))
    assert part.stopped and part.global_step == 4
    resumed = train(_model(), _data(), _cfg(tmp_path / "b", resume_from_checkpoint="latest", **settings))
    assert resumed.global_step == 8
    for key, value in full.lora_state.items():
        assert torch.equal(value, resumed.lora_state[key]), key
    assert full.loss_history == resumed.loss_history


class _TwoBuckets(torch.utils.data.Dataset):
    """Clips of two sizes; `bucket_of` answers without reading, as the real datasets do."""

    sizes = ((32, 48, 5), (64, 96, 9), (32, 48, 5))  # (height px, width px, frames)

    def __init__(self):
        self.read = []

    def __len__(self):
        return len(self.sizes)

    def bucket_of(self, i):
        return self.sizes[i][:2]

    def __getitem__(self, i):
        self.read.append(i)
        h, w, f = self.sizes[i]
        return {"latents": torch.zeros(16, (f - 1) // 4 + 1, h // 8, w // 8)}


def test_the_memory_plan_sizes_for_the_largest_clip_reading_one_item():
    from trainer.train.loop import _largest_clip_shape

    data = _TwoBuckets()
    assert _largest_clip_shape(data) == {"height": 64, "width": 96, "frames": 9}
    assert data.read == [1]
