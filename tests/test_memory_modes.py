"""Memory modes on the tiny model: int8/fp8 base weights, block offload, checkpoint
policies, activation offload, chunked feed-forward, the refused precisions and exclusivity.

Tolerances (tiny model, bf16 weights, bf16 autocast on CPU, loss = MSE to a random target,
LoRA r4 with non-zero A and B):
- int8-quanto vs bf16: loss within 0.1% relative and the velocity output within 2% relative
  L2 (measured: 0.002% and 0.5%).
- fp8 e4m3 + per-tensor scale vs bf16: loss within 0.5% relative and the output within 4%
  relative L2 (measured: 0.07% and 1.0%).
- every offload/checkpoint mode vs the same precision without it: loss and every LoRA
  gradient equal to 1e-5 relative (same arithmetic, only where the weights live differs).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_transformer_s2v import inputs

from trainer.memory import MemoryConfig, MemoryConfigError, apply_memory_config
from trainer.memory.offload import BlockOffloader
from trainer.memory.quantize import Fp8Linear
from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel

PRECISION_TOLERANCE = {"no_change": 0.0, "int8-quanto": 1e-3, "fp8": 5e-3}  # loss, relative
OUTPUT_TOLERANCE = {"no_change": 0.0, "int8-quanto": 0.02, "fp8": 0.04}  # output, relative L2


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG).to(torch.bfloat16)


def add_lora(model, seed=3):
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = (torch.randn(p.shape, generator=gen) * 0.05).float()
            params[name] = p
    return params


def build(base_model, **memory):
    model = copy.deepcopy(base_model)
    setup = apply_memory_config(model, MemoryConfig(**memory), "cpu")
    params = add_lora(model)
    setup.after_lora()
    model.train()
    return model, params, setup


def loss_and_grads(model, params, seed=1, autocast=True):
    x = inputs(seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    target = torch.randn(x["hidden_states"].shape, generator=gen)
    for p in params.values():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**x).sample
    loss = torch.nn.functional.mse_loss(out.float(), target)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in params.items()}


def output(model):
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs(seed=1)).sample.float()
    model.train()
    return out


@pytest.fixture(scope="module")
def reference(base_model):
    model, params, _ = build(base_model, gradient_checkpointing="full")
    return loss_and_grads(model, params)


@pytest.mark.parametrize("precision", ["no_change", "int8-quanto", "fp8"])
def test_precision_loss_matches_bf16_and_lora_trains(base_model, reference, precision):
    model, params, setup = build(base_model, base_model_precision=precision, gradient_checkpointing="full")
    if precision != "no_change":
        assert setup.converted_linears == 48  # 4 blocks x 10 + 2 injectors x 4
    ref_model, _, _ = build(base_model, gradient_checkpointing="full")
    expected = output(ref_model)
    error = ((output(model) - expected).norm() / expected.norm()).item()
    assert error <= OUTPUT_TOLERANCE[precision], (precision, error)
    loss, grads = loss_and_grads(model, params)
    ref_loss, _ = reference
    assert abs(loss - ref_loss) <= PRECISION_TOLERANCE[precision] * ref_loss + 1e-6, (precision, loss, ref_loss)
    assert len(grads) == len(reference[1])
    for name, g in grads.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
    # an optimizer step changes the loss: the LoRA really trains on top of the converted base
    opt = torch.optim.SGD(params.values(), lr=1.0)
    opt.step()
    loss_after, _ = loss_and_grads(model, params)
    assert loss_after < loss


def test_fp8_and_int8_types_and_what_stays_bf16(base_model):
    from optimum.quanto import QLinear

    for precision, cls in (("fp8", Fp8Linear), ("int8-quanto", QLinear)):
        model = copy.deepcopy(base_model)
        apply_memory_config(model, MemoryConfig(base_model_precision=precision), "cpu")
        assert isinstance(model.blocks[0].attn1.to_q, cls)
        assert isinstance(model.blocks[3].ffn.net[2], cls)
        assert isinstance(model.audio_injector.injector[1].to_out[0], cls)
        # head, embedders, modulation and AdaIN projections stay as they were
        for name in ("proj_out", "condition_embedder.time_proj", "audio_injector.injector_adain_layers.0.linear"):
            module = model.get_submodule(name)
            assert type(module) is torch.nn.Linear and module.weight.dtype == torch.bfloat16, name
        assert model.blocks[0].scale_shift_table.dtype == torch.bfloat16
    fp8 = copy.deepcopy(base_model)
    apply_memory_config(fp8, MemoryConfig(base_model_precision="fp8"), "cpu")
    assert fp8.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("name", ["nf4", "int4", "int4-quanto", "NF4"])
def test_4bit_precisions_are_refused(name):
    with pytest.raises(MemoryConfigError, match="sensitive"):
        MemoryConfig(base_model_precision=name).validate()


def test_block_offload_and_model_offload_are_exclusive():
    with pytest.raises(MemoryConfigError, match="mutually exclusive"):
        MemoryConfig.from_dict({"offload": "blocks", "enable_model_cpu_offload": True})
    with pytest.raises(MemoryConfigError, match="mutually exclusive"):
        MemoryConfig.from_dict({"enable_block_offload": True, "offload": "model"})
    with pytest.raises(MemoryConfigError, match="checkpointed"):
        MemoryConfig(offload="blocks", gradient_checkpointing="none").validate()
    with pytest.raises(MemoryConfigError, match="unknown"):
        MemoryConfig.from_dict({"offlaod": "blocks"})


OFFLOAD_MODES = [
    {"offload": "blocks"},
    {"offload": "blocks", "prefetch": 0},
    {"offload": "blocks", "gradient_checkpointing": "attention"},
    {"offload": "blocks", "offload_activations": True},
    {"gradient_checkpointing": "attention"},
    {"gradient_checkpointing": "attention", "attention_blocks": 2},
    {"gradient_checkpointing": "interval", "checkpoint_interval": 2},
    {"gradient_checkpointing": "none"},
    {"offload_activations": True},
    {"enable_chunked_feed_forward": True, "feed_forward_chunk_size": 7},
]


@pytest.mark.parametrize("precision", ["no_change", "int8-quanto", "fp8"])
@pytest.mark.parametrize("mode", OFFLOAD_MODES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_modes_give_same_loss_and_grads(base_model, precision, mode):
    ref_model, ref_params, _ = build(base_model, base_model_precision=precision, gradient_checkpointing="full")
    ref_loss, ref_grads = loss_and_grads(ref_model, ref_params)
    memory = {"gradient_checkpointing": "full", **mode}
    model, params, setup = build(base_model, base_model_precision=precision, **memory)
    for _ in range(2):  # twice: the swap state after a step is right for the next one
        loss, grads = loss_and_grads(model, params)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    if setup.offloader is not None:
        assert_swapped_out(setup.offloader)


def assert_swapped_out(offloader: BlockOffloader):
    """Between steps every frozen block weight is a meta placeholder; LoRA stays real."""
    assert not offloader.active
    model = offloader.model
    for name, p in model.blocks.named_parameters():
        if p.requires_grad:
            assert p.device.type == "cpu", name
        else:
            assert p.device.type == "meta", name
    for name, p in model.named_parameters():
        if not name.startswith(("blocks.", "audio_injector.")):
            assert p.device.type == "cpu", name


def test_offload_order_forward_and_backward(base_model):
    model, params, setup = build(base_model, offload="blocks")
    off = setup.offloader
    off.record = True
    loss_and_grads(model, params)
    runs = [(kind, r) for kind, r in off.log if kind.startswith("run")]
    assert runs == [("run", i) for i in range(4)] + [("run-backward", i) for i in (3, 2, 1, 0)]
    # every region was prefetched on the side (no synchronous load) except the first one
    loads = [r for kind, r in off.log if kind == "load"]
    assert loads == [0]
    with torch.no_grad():  # inference (sampling) with offload works too
        model.eval()
        model(**inputs(seed=2))
    assert not off.active


def test_offload_to_disk(base_model, tmp_path, reference):
    model, params, setup = build(base_model, offload="blocks", offload_blocks_to_disk=str(tmp_path / "spill"))
    assert (tmp_path / "spill" / "block_offload.safetensors").stat().st_size > 0
    assert setup.offloader.host_bytes == 0
    loss, grads = loss_and_grads(model, params)
    assert loss == pytest.approx(reference[0], rel=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, reference[1][name], rtol=1e-4, atol=1e-6)


def test_feed_forward_chunk_from_env(monkeypatch, base_model):
    monkeypatch.setenv("WAN_FEED_FORWARD_CHUNK_SIZE", "5")
    cfg = MemoryConfig(enable_chunked_feed_forward=True)
    assert cfg.resolved_feed_forward_chunk_size() == 5
    model = copy.deepcopy(base_model)
    apply_memory_config(model, cfg, "cpu")
    assert all(b.ffn_chunk_size == 5 for b in model.blocks)
    assert MemoryConfig().resolved_feed_forward_chunk_size() is None


def test_checkpoint_labels(base_model):
    model = copy.deepcopy(base_model)
    setup = apply_memory_config(model, MemoryConfig(gradient_checkpointing="interval", checkpoint_interval=2,
                                                    offload_activations=True), "cpu")
    assert setup.checkpoint_labels == ["full+host", "none", "full+host", "none"]
    setup = apply_memory_config(model, MemoryConfig(gradient_checkpointing="attention", attention_blocks=1), "cpu")
    assert setup.checkpoint_labels == ["attention", "full", "full", "full"]
    assert not setup.compiled_regions


@pytest.mark.parametrize(("memory", "regions"), [
    ({"gradient_checkpointing": "attention", "offload_activations": True}, True),
    ({"gradient_checkpointing": "full"}, True),
    ({"gradient_checkpointing": "none"}, False),
    ({"gradient_checkpointing": "attention", "offload": "blocks"}, False),  # the swap runs between regions
    ({"gradient_checkpointing": "attention", "base_model_precision": "int8-quanto"}, False),
    ({"gradient_checkpointing": "attention", "tread": True}, False),  # routed blocks see fewer tokens
])
def test_compiled_regions_only_where_they_apply(base_model, memory, regions):
    """The loop asks for compiled checkpoint regions on CUDA; they are used for bf16 weights
    without weight offload, with checkpointing and without TREAD routes on the model, and the
    model's self-attention then gives SDPA contiguous heads."""
    model = copy.deepcopy(base_model)
    memory = dict(memory)
    if memory.pop("tread", False):
        model.set_token_routes({"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": 2}]})
    setup = apply_memory_config(model, MemoryConfig(**memory), "cpu", compile_regions=True)
    assert setup.compiled_regions is regions
    assert model.blocks[0].attn1.contiguous_heads is regions
    assert ("compiled checkpoint regions" in setup.describe()) is regions


def test_activation_offload_moves_block_inputs_and_keeps_gradients(base_model, reference):
    """Every checkpointed block hands its input hidden states to the offload hooks once per
    step (here copied, since the model is on the CPU), and loss and LoRA gradients stay equal."""
    model, params, _ = build(base_model, offload_activations=True)
    offload = model.block_checkpointing[0].offload
    assert all(run.offload is offload for run in model.block_checkpointing)
    offload.min_bytes = 0
    loss, grads = loss_and_grads(model, params)
    assert loss == pytest.approx(reference[0], rel=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, reference[1][name], rtol=1e-4, atol=1e-6)
    batch, _, frames, height, width = inputs(seed=1)["hidden_states"].shape
    video_tokens = batch * frames * (height // 2) * (width // 2)
    dim = base_model.config.num_attention_heads * base_model.config.attention_head_dim
    # at least each block's [B, S, dim] input, in bf16 or wider
    assert offload.moved_bytes >= len(model.blocks) * video_tokens * dim * 2
    offload.reset_stats()
    offload.min_bytes = 2**40  # nothing qualifies: nothing moves
    loss_and_grads(model, params)
    assert offload.moved_bytes == 0


@pytest.mark.parametrize("variant", ["plain", "tread", "merged+linears"])
def test_compiled_checkpoint_regions_match_eager(base_model, variant):
    """compile_regions: each checkpointed block (+ its audio injection) is one compiled graph
    with the checkpoint inside; with the selective "attention" policy and the host-offload
    hooks outside it (which then move everything large a region saves), loss and LoRA
    gradients match eager checkpointing (fp32, so the comparison is not blurred by bf16
    rounding), and the compiled region is shared by the blocks (not one graph per block
    index). With a TREAD route the routed blocks run the same regions on fewer tokens; with
    merged-weight LoRA layers and two "linears" blocks (their saved tensors stay on the
    device) the gradients are still eager's."""
    from torch._dynamo.utils import counters

    from trainer.lora.merged_linear import use_merged_lora
    from trainer.memory.apply import configure_checkpointing

    tread, merged = variant == "tread", variant == "merged+linears"
    fp32_model = copy.deepcopy(base_model).float()  # bf16 would differ by the compiler's fusions
    routes = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": 2}]} if tread else None
    eager, eager_params, _ = build(fp32_model, gradient_checkpointing="attention")
    eager.set_token_routes(routes)
    torch.manual_seed(7)  # the same routed tokens in both runs
    expected = loss_and_grads(eager, eager_params, autocast=False)
    torch._dynamo.reset()
    counters.clear()
    model, params, _ = build(fp32_model)
    memory = MemoryConfig(gradient_checkpointing="attention", offload_activations=True, linear_blocks=2 * merged)
    labels = configure_checkpointing(model, memory, compile_regions=True)
    assert labels == (["linears"] * 2 if merged else ["attention+host"] * 2) + ["attention+host"] * 2
    assert use_merged_lora(model, merged) == 40  # 4 blocks x 8 + 2 injectors x 4
    model.set_token_routes(routes)
    runs = model.block_checkpointing
    assert [hasattr(run, "offload") for run in runs] == [label.endswith("+host") for label in labels]
    offload = runs[-1].offload
    offload.min_bytes = 0
    torch.manual_seed(7)
    loss, grads = loss_and_grads(model, params, autocast=False)
    assert loss == pytest.approx(expected[0], rel=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[1][name], rtol=1e-4, atol=1e-6)
    assert offload.moved_bytes > 0
    # blocks with and without an audio injector (and per block policy): a few graphs for all
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs <= (5 if tread or merged else 3), graphs


def test_compiled_regions_do_not_recompute_the_ffn_output(base_model):
    """Inside compiled regions the "attention" policy keeps the FFN's down-projection output
    where the backward reads it (blocks followed by an audio injector, whose AdaIN backward
    needs the block output), so no block's backward redoes that matmul (eager checkpointing,
    which re-runs each block's forward, shows that the count sees such calls)."""
    from torch.profiler import profile

    from trainer.memory.apply import configure_checkpointing

    config = TINY_TRANSFORMER_CONFIG
    dim = config["num_attention_heads"] * config["attention_head_dim"]

    def ffn_down_calls_in_backward(compile_regions: bool) -> int:
        torch._dynamo.reset()
        model, _, _ = build(copy.deepcopy(base_model).float())
        configure_checkpointing(model, MemoryConfig(gradient_checkpointing="attention"), compile_regions=compile_regions)
        out = model(**inputs(seed=1)).sample
        with profile(record_shapes=True) as prof:
            out.square().mean().backward()
        return sum(1 for e in prof.events()  # addmm(bias [dim], x [tokens, ffn], W^T [ffn, dim])
                   if e.name == "aten::addmm" and list(e.input_shapes[0]) == [dim]
                   and list(e.input_shapes[2]) == [config["ffn_dim"], dim])

    assert ffn_down_calls_in_backward(compile_regions=False) > 0
    assert ffn_down_calls_in_backward(compile_regions=True) == 0


def test_linear_blocks_need_the_attention_policy():
    with pytest.raises(MemoryConfigError, match="linear_blocks needs"):
        MemoryConfig(gradient_checkpointing="full", linear_blocks=2).validate()
    with pytest.raises(MemoryConfigError, match="linear_blocks must be an integer >= 0"):
        MemoryConfig(gradient_checkpointing="attention", linear_blocks=-1).validate()
    assert "linears:5" in MemoryConfig(gradient_checkpointing="attention", linear_blocks=5).describe()


def test_host_buffer_pool_reuses_exact_sizes_and_refuses_when_ram_is_short():
    """The offload's host buffers: exactly the bytes asked for (no power-of-two rounding),
    the same buffer again for the same size once given back, and None (keep the tensor on
    the device) when a new buffer would eat into the host RAM reserve."""
    from trainer.memory.activations import HostBufferPool, _host_view, available_host_bytes

    pool = HostBufferPool(reserve_bytes=0, register=False)
    first = pool.take(3 * 2**20 + 5)
    assert first.numel() == 3 * 2**20 + 5 and pool.held_bytes == first.numel()
    pool.give_back(first)
    assert pool.take(3 * 2**20 + 5) is first
    assert pool.take(3 * 2**20 + 5) is not first  # in use: a second buffer
    assert pool.held_bytes == 2 * (3 * 2**20 + 5)
    if available_host_bytes() is not None:
        assert HostBufferPool(reserve_bytes=2**60, register=False).take(1024) is None
    # a view of the buffer keeps a transposed tensor's strides
    like = torch.randn(6, 4).t()
    view = _host_view(HostBufferPool(reserve_bytes=0, register=False).take(like.numel() * 4), like)
    assert view.shape == like.shape and view.stride() == like.stride()


def test_activation_offload_keeps_the_last_blocks_tensors_on_the_device():
    """Each block's saved tensors leave for the host when the next block starts, so the
    last block of a forward (whose backward runs first) hands its own back without a round
    trip; the gradients are those of the plain computation, step after step."""
    from torch.utils.checkpoint import checkpoint

    from trainer.memory.activations import ActivationOffload

    def block(h, w):
        return torch.tanh(h @ w)

    torch.manual_seed(0)
    weights = [torch.randn(16, 16, requires_grad=True) for _ in range(3)]
    x = torch.randn(8, 16, requires_grad=True)
    h = x
    for w in weights:
        h = block(h, w)
    expected = torch.autograd.grad(h.square().sum(), [x, *weights])
    offload = ActivationOffload(min_bytes=0)
    for blocks in (3, 3, 1):
        offload.reset_stats()
        h = x
        for w in weights[:blocks]:
            with offload.hooks():
                h = checkpoint(block, h, w, use_reentrant=False)
        assert offload.window_bytes > 0
        assert offload.moved_bytes == (blocks - 1) * offload.window_bytes  # all but the last block's
        grads = torch.autograd.grad(h.square().sum(), [x, *weights[:blocks]])
        if blocks == len(weights):
            for got, want in zip(grads, expected, strict=True):
                torch.testing.assert_close(got, want)


def _alive_originals_at_each_conversion(model, monkeypatch, owner, method, run) -> list[int]:
    """Run `run(model)` and count, each time `owner.method` converts a layer, how many of the
    model's original base weights are still alive."""
    import gc
    import weakref

    from trainer.memory.quantize import quantizable_linears

    originals = [weakref.ref(layer.weight) for _, layer in quantizable_linears(model)]
    counts = []
    convert = getattr(owner, method)

    def spy(*args, **kwargs):
        gc.collect()
        counts.append(sum(ref() is not None for ref in originals))
        return convert(*args, **kwargs)

    monkeypatch.setattr(owner, method, spy)
    run(model)
    return counts


@pytest.mark.parametrize("conversion", ["fp8", "fp8_compute", "fp8_back_to_bf16"])
def test_each_old_layer_is_released_once_its_replacement_is_in(base_model, monkeypatch, conversion):
    """A model converted where it lives (a GPU-resident model, `offload="none"`) must not hold
    both precisions of every layer at once: each replaced layer's weights go when it is."""
    from trainer.memory.fp8_compute import Fp8ComputeLinear, enable_fp8_compute
    from trainer.memory.quantize import dequantize_fp8, quantize_fp8

    model = copy.deepcopy(base_model)
    if conversion == "fp8":
        counts = _alive_originals_at_each_conversion(model, monkeypatch, Fp8Linear, "from_linear", quantize_fp8)
    elif conversion == "fp8_compute":
        counts = _alive_originals_at_each_conversion(
            model, monkeypatch, Fp8ComputeLinear, "from_linear", lambda m: enable_fp8_compute(m, "cpu", kind="emulated"))
    else:
        quantize_fp8(model)
        counts = _alive_originals_at_each_conversion(model, monkeypatch, Fp8Linear, "to_linear", dequantize_fp8)
    assert len(counts) > 4
    assert counts == list(range(counts[0], counts[0] - len(counts), -1)), counts
