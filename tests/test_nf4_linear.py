"""NF4Linear and quantize_model: autograd math, bitsandbytes Linear4bit state dicts both ways, model swaps.

Math: forward equals F.linear(x, dequantize(W), b) and grad_x equals grad_y @ dequantize(W) (checked in
float64); the weight never gets a gradient. Interchange: a state dict written by bitsandbytes' Linear4bit
(quant_type="nf4") loads into NF4Linear with identical outputs, ours loads into Linear4bit with identical
outputs, and the two state dicts for the same nn.Linear are equal key by key (layout, dtypes, JSON bytes).
"""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import minift
from minift.quant import NF4Linear, NF4Tensor, nf4_nbytes, quantize_model
from minift.quant.linear import NF4LinearFunction


@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes, with torch.compile off: bnb compiles some CPU helpers, which costs seconds."""
    module = pytest.importorskip("bitsandbytes")
    with torch._dynamo.config.patch(disable=True):
        yield module


def make_linear(in_features=40, out_features=6, bias=True, dtype=torch.float32, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def bnb_linear4bit(bnb, linear: nn.Linear, double_quant: bool):
    """Quantize `linear` with bitsandbytes' Linear4bit (NF4) on the CPU, keeping the weight's dtype."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant, module=layer)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")  # quantization happens here


def load_into_bnb(bnb, state_dict: dict, in_features: int, out_features: int):
    """Load a Linear4bit-layout state dict into bitsandbytes the way transformers does (from_prequantized)."""
    layer = bnb.nn.Linear4bit(in_features, out_features, bias="bias" in state_dict, quant_type="nf4")
    stats = {k.removeprefix("weight."): v for k, v in state_dict.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(data=state_dict["weight"], quantized_stats=stats,
                                                       requires_grad=False, device="cpu", module=layer)
    if "bias" in state_dict:
        layer.bias = nn.Parameter(state_dict["bias"].clone(), requires_grad=False)
    return layer


# ----------------------------------------------------------------------------------- math


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_and_grad_x_match_dequantize_then_linear(dtype):
    layer = NF4Linear.from_linear(make_linear(dtype=dtype))
    x = torch.randn(3, 5, 40, dtype=dtype, requires_grad=True)
    y = layer(x)
    weight = layer.weight.dequantize(dtype)  # (6, 40)
    assert y.dtype == dtype and torch.equal(y, F.linear(x, weight, layer.bias))  # the same ops, bit for bit

    weight64, x64, bias64 = weight.double(), x.detach().double(), layer.bias.detach().double()
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.double(), F.linear(x64, weight64, bias64), **tolerance)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    torch.testing.assert_close(x.grad.double(), grad_y.double() @ weight64, **tolerance)
    assert [name for name, _ in layer.named_parameters()] == ["bias"] and not layer.bias.requires_grad
    assert layer.bias.grad is None and not isinstance(layer.weight, torch.Tensor)  # nothing on W to train


def test_gradcheck_in_float64_and_trainable_bias():
    layer = NF4Linear.from_linear(make_linear(in_features=17, out_features=3), train_bias=True)
    x = torch.randn(2, 17, dtype=torch.float64, requires_grad=True)
    bias = layer.bias.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, b: NF4LinearFunction.apply(x, layer.weight, b), (x, bias))
    y = layer(torch.randn(2, 3, 17))
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    torch.testing.assert_close(layer.bias.grad, grad_y.sum(dim=(0, 1)))


def test_compute_dtype_and_dtype_moves():
    linear = make_linear()
    layer = NF4Linear.from_linear(linear, compute_dtype=torch.bfloat16)
    x = torch.randn(2, 40)
    y = layer(x)
    expected = F.linear(x.bfloat16(), layer.weight.dequantize(torch.bfloat16), layer.bias.bfloat16()).float()
    assert y.dtype == torch.float32 and torch.equal(y, expected)
    packed = layer.weight.packed.clone()
    layer.half().to("cpu")  # casts the bias only; the 4-bit data and its recorded dtype stay
    assert torch.equal(layer.weight.packed, packed) and layer.weight.dtype == torch.float32
    assert layer.bias.dtype == torch.float16 and layer(x.half()).dtype == torch.float16
    with pytest.raises(ValueError, match=r"inputs \(\.\.\., 40\)"):
        layer(torch.randn(2, 41))


# ----------------------------------------------------------------------------------- bitsandbytes files


@pytest.mark.parametrize("double_quant", [True, False], ids=["double", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_bitsandbytes_state_dict_loads_with_identical_outputs(bnb, dtype, double_quant):
    linear = make_linear(in_features=40, out_features=7, dtype=dtype, seed=1)  # 280 weights: a partial block
    theirs = bnb_linear4bit(bnb, linear, double_quant)
    ours = NF4Linear(40, 7, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    assert ours.weight.dtype == dtype and ours.weight.double_quant == double_quant
    expected_weight = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    assert torch.equal(ours.dequantize(), expected_weight)
    x = torch.randn(3, 5, 40, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("double_quant", [True, False], ids=["double", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_our_state_dict_equals_bitsandbytes_and_loads_into_it(bnb, dtype, double_quant):
    linear = make_linear(in_features=64, out_features=300, dtype=dtype, seed=2)  # 300 blocks: 2 nested blocks
    ours = NF4Linear.from_linear(linear, double_quant=double_quant)
    mine, theirs = ours.state_dict(), bnb_linear4bit(bnb, linear, double_quant).state_dict()
    assert list(mine) == list(theirs)
    for key in mine:
        assert mine[key].dtype == theirs[key].dtype and mine[key].shape == theirs[key].shape, key
        assert torch.equal(mine[key], theirs[key]), key
    quant_state = json.loads(bytes(mine["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert quant_state["dtype"] == str(dtype).removeprefix("torch.") and quant_state["shape"] == [300, 64]

    loaded = load_into_bnb(bnb, mine, 64, 300)
    x = torch.randn(4, 64, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(loaded(x), ours(x))


def test_safetensors_round_trip(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    ours = NF4Linear.from_linear(make_linear(in_features=33, out_features=9))
    safetensors.save_file(ours.state_dict(), tmp_path / "layer.safetensors")
    again = NF4Linear(33, 9)
    again.load_state_dict(safetensors.load_file(tmp_path / "layer.safetensors"))
    x = torch.randn(2, 33)
    assert torch.equal(again(x), ours(x))


def test_dense_state_dict_is_quantized_on_load():
    linear = make_linear()
    layer = NF4Linear(40, 6)
    layer.load_state_dict(linear.state_dict())
    reference = NF4Linear.from_linear(linear)
    assert torch.equal(layer.weight.packed, reference.weight.packed)
    assert torch.equal(layer.dequantize(), reference.dequantize())


def test_mismatched_state_dicts_give_clear_errors(bnb):
    good = NF4Linear.from_linear(make_linear()).state_dict()
    with pytest.raises(RuntimeError, match=r"weight: checkpoint shape \(6, 40\), expected \(8, 40\)"):
        NF4Linear(40, 8).load_state_dict(good)
    bad = dict(good, **{"weight.absmax": good["weight.absmax"][:-1]})
    with pytest.raises(RuntimeError, match=r"weight.absmax: expected uint8 of shape \(4,\), found uint8 of shape \(3,\)"):
        NF4Linear(40, 6).load_state_dict(bad)
    bad = dict(good, weight=good["weight"][:-1])
    with pytest.raises(RuntimeError, match=r"weight: expected uint8 of shape \(120, 1\), found uint8 of shape \(119, 1\)"):
        NF4Linear(40, 6).load_state_dict(bad)
    bad = {k: v for k, v in good.items() if k != "weight.quant_state.bitsandbytes__nf4"}
    with pytest.raises(RuntimeError, match="needs weight.quant_state.bitsandbytes__nf4"):
        NF4Linear(40, 6).load_state_dict(bad)
    bad = dict(good, **{"weight.quant_map": good["weight.quant_map"].flip(0)})
    with pytest.raises(RuntimeError, match="weight.quant_map is not the NF4 table"):
        NF4Linear(40, 6).load_state_dict(bad)
    with pytest.raises(RuntimeError, match=r"weight: dense weight of shape \(6, 40\), expected \(6, 41\)"):
        NF4Linear(41, 6).load_state_dict(make_linear().state_dict())
    fp4 = bnb.nn.Linear4bit(40, 6, quant_type="fp4").to("cpu").state_dict()
    with pytest.raises(RuntimeError, match="FP4"):
        NF4Linear(40, 6).load_state_dict(fp4)
    result = NF4Linear(40, 6).load_state_dict({"bias": good["bias"], "weight.extra": torch.ones(1)}, strict=False)
    assert result.missing_keys == ["weight"] and result.unexpected_keys == ["weight.extra"]
    result = NF4Linear(40, 6).load_state_dict(dict(good, **{"weight.extra": torch.ones(1)}), strict=False)
    assert result.unexpected_keys == ["weight.extra"]


# ----------------------------------------------------------------------------------- whole models


def tiny_transformer(tie=False) -> minift.Transformer:
    torch.manual_seed(0)
    config = minift.ModelConfig(vocab_size=64, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256,
                                qkv_bias=True, tie_embeddings=tie)
    return minift.Transformer(config).eval()


def test_quantize_model_swaps_linear_layers_and_reports_bytes():
    model = tiny_transformer()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        before = model(ids)
    report = quantize_model(model)
    linear_names = [f"blocks.{i}.{part}" for i in range(2) for part in
                    ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert sorted(report.quantized) == sorted(linear_names)
    assert all(isinstance(model.get_submodule(name), NF4Linear) for name in linear_names)
    assert type(model.lm_head) is nn.Linear and "lm_head" in report.skipped
    assert type(model.embed) is nn.Embedding
    expected_bytes = sum(nf4_nbytes(model.get_submodule(n).weight.numel()) for n in linear_names)
    assert report.quantized_bytes == expected_bytes
    assert report.bytes_per_param_quantized == pytest.approx(0.516, abs=2e-3)  # REFERENCE.md: 4.127 bits
    assert report.model_bytes < report.model_bytes_before and "bytes/param" in str(report)

    embedding = model.embed.weight
    logits = model(ids)
    cosine = F.cosine_similarity(logits.flatten(), before.flatten(), dim=0)
    assert cosine > 0.98, f"4-bit model drifted: cosine {cosine:.4f}"
    logits.sum().backward()  # grad_x flows back through every frozen NF4 layer to the embedding
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0


def test_quantize_model_plain_skip_patterns_and_tied_weights():
    model = tiny_transformer(tie=True)
    report = quantize_model(model, skip=("*.mlp.*",), double_quant=False)
    assert report.skipped["lm_head"].startswith("weight tied to embed") and type(model.lm_head) is nn.Linear
    assert len(report.quantized) == 8 and all(".attn." in name for name in report.quantized)
    assert report.bytes_per_param_quantized == pytest.approx(0.5625, abs=1e-3)  # 4.5 bits


def test_quantize_model_on_sequential_and_torch_transformer_layer():
    torch.manual_seed(0)
    sequential = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    report = quantize_model(sequential)
    assert report.quantized == ["0", "2"] and isinstance(sequential[2], NF4Linear)
    assert sequential(torch.randn(3, 16)).shape == (3, 4)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    report = quantize_model(layer)
    assert sorted(report.quantized) == ["linear1", "linear2"]
    assert "self_attn.out_proj" in report.skipped and "MultiheadAttention" in report.skipped["self_attn.out_proj"]
    assert layer(torch.randn(2, 5, 32)).shape == (2, 5, 32)
    with pytest.raises(ValueError, match="from_linear"):
        quantize_model(nn.Linear(4, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_forward_matches_cpu_reference():
    layer = NF4Linear.from_linear(make_linear(in_features=256, out_features=96))
    x = torch.randn(4, 256)
    expected = layer(x)
    assert isinstance(layer.cuda().weight, NF4Tensor) and layer.weight.device.type == "cuda"
    torch.testing.assert_close(layer(x.cuda()).cpu(), expected, rtol=1e-3, atol=1e-3)
