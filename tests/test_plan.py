"""`minift plan` against the figures the papers state (minift/plan.py holds the formulas and their sources).

Each test quotes the sentence or table it checks and asserts only the number the source gives, with a
tolerance no looser than the source's own rounding (or its "roughly"). The models are built on the meta
device, so a 70B count costs about a second and no memory.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from minift import plan
from minift.cli import main
from minift.config import ModelConfig

GB = 1e9
ROOT = Path(__file__).resolve().parents[1]


def gpt3_175b(dropout: float = 0.1) -> ModelConfig:
    """GPT-3 175B (Brown et al. 2020, Table 2.1): 96 layers, d_model 12288, 96 heads, d_ff = 4 d_model,
    context 2048, GPT-2's 50257-token vocabulary, learned positions, tied embeddings."""
    return ModelConfig(model_type="gpt2", vocab_size=50257, dim=12288, n_layers=96, n_heads=96, hidden_dim=4 * 12288,
                       max_seq_len=2048, norm="layer", positions="learned", mlp="gelu", activation="gelu_tanh",
                       qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True, dropout=dropout)


def test_published_sizes_have_the_published_parameter_counts():
    """LLaMA (Touvron et al. 2023a), Table 2 "params": 6.7B, 13.0B, 32.5B, 65.2B. The table truncates to one
    decimal (65,285,660,672 parameters print as 65.2B), so we truncate too; Llama 2's 70B is a name, not a count."""
    for size, billions in [("7b", 6.7), ("13b", 13.0), ("33b", 32.5), ("65b", 65.2)]:
        total = plan.count_parameters(plan.size_config(size)).total
        assert math.floor(total / 1e8) / 10 == billions, (size, total)
    assert 68e9 < plan.count_parameters(plan.size_config("70b")).total < 70e9


def test_zero_mixed_precision_adam_is_16_bytes_and_stage_3_divides_by_n():
    """Rajbhandari et al. 2020 (ZeRO), Figure 1: a 7.5B model on 64 GPUs with mixed-precision Adam (K = 12)
    holds 120GB of model states per device in plain data parallelism and 1.9GB with P_os+g+p (stage 3, what
    FSDP's full sharding is); §3.1: "a 1.5B parameter model ... at least 24 GB". The figure rounds to one
    decimal (1.875 -> 1.9), hence the 0.05 GB tolerance; 120 and 24 are exact products."""
    def model_states(params: int, strategy: str, gpus: int) -> int:
        counts = plan.Counts(total=params, adapters=0, units=[params], nf4_bytes=0, nf4_unit_bytes=[0],
                             adapter_units=[0])
        states = plan.states_per_gpu(counts, "full", strategy, gpus)
        return states["weights"] + states["gradients"] + states["optimizer"]

    assert model_states(7_500_000_000, "ddp", 64) == 120 * GB
    assert abs(model_states(7_500_000_000, "fsdp", 64) / GB - 1.9) < 0.05
    assert model_states(1_500_000_000, "ddp", 1) == 24 * GB


@pytest.mark.parametrize("seq_len,batch", [(2048, 1), (512, 8)])
def test_activations_reduce_to_korthikanti_34sbh_plus_5as2b(seq_len, batch):
    """Korthikanti et al. 2022, §4.1, eq. (1): a GPT layer (4h GELU MLP, dropout) keeps sbh(34 + 5as/h) bytes
    with 16-bit activations; §4.2 full recomputation keeps 2sbh per layer. Exact: both are integer counts."""
    config = gpt3_175b()
    s, b, h, a = seq_len, batch, config.dim, config.n_heads
    assert plan.layer_activation_bytes(config, s, b, "eager") == 34 * s * b * h + 5 * a * s * s * b
    # flash/SDPA keeps no s x s tensor: the 5as^2b terms become a 4-byte logsumexp per head and query
    assert plan.layer_activation_bytes(config, s, b, "sdpa") == 34 * s * b * h + 4 * a * s * b
    no_ckpt = plan.activation_bytes(config, s, b, "eager", checkpointing=False)
    ckpt = plan.activation_bytes(config, s, b, "eager", checkpointing=True)
    layer, outside = plan.layer_activation_bytes(config, s, b, "eager"), plan.outside_activation_bytes(config, s, b)
    assert no_ckpt == 96 * layer + outside
    assert ckpt == 96 * 2 * s * b * h + layer + outside


def test_lora_on_gpt3_175b_matches_hu_et_al():
    """Hu et al. 2021 (LoRA), §4.2: "On GPT-3 175B, we reduce the VRAM consumption during training from 1.2TB to
    350GB. With r = 4 and only the query and value projection matrices being adapted, the checkpoint size is
    reduced by roughly 10,000x (from 350GB to 35MB)"; abstract: trainable parameters "by 10,000 times".

    Checked: the frozen 16-bit base plus the adapters' states is 350GB (within 1%: 350 is a round figure of
    2 bytes x 175B); the adapters in 16 bits are 35MB and 10,000x fewer parameters, each within 10% ("roughly";
    we get 37.7MB and 9,250x). Not checked: the 1.2TB of full fine-tuning, for which the paper gives no breakdown
    (1.2TB / 175B = 6.9 bytes per parameter, fewer than the 16 of mixed-precision Adam counted here)."""
    config = gpt3_175b()
    counts = plan.count_parameters(config, lora_r=4, lora_targets=["q_proj", "v_proj"])
    assert abs(counts.total / 175e9 - 1) < 0.005  # the model itself is GPT-3 175B
    assert counts.adapters == 96 * 2 * 4 * (12288 + 12288)
    lora = plan.states_per_gpu(counts, "lora", "ddp", 1)
    assert abs((lora["weights"] + lora["gradients"] + lora["optimizer"]) / (350 * GB) - 1) < 0.01
    assert abs(2 * counts.adapters / 35e6 - 1) < 0.10
    assert abs(counts.total / counts.adapters / 10_000 - 1) < 0.10
    full = plan.states_per_gpu(counts, "full", "ddp", 1)
    assert full["optimizer"] / lora["optimizer"] == counts.total / counts.adapters  # frozen: no optimizer state


def test_qlora_65b_on_one_48gb_gpu_as_dettmers_et_al():
    """Dettmers et al. 2023 (QLoRA), abstract: QLoRA "reduces memory usage enough to finetune a 65B parameter
    model on a single 48GB GPU"; §1: "from >780GB of GPU memory to <48GB"; double quantization saves "0.373 bits
    per parameter ... approximately 3 GB for a 65B model".

    The run is the paper's Guanaco 65B recipe (artidoro/qlora, scripts/finetune_guanaco_65b.sh): LoRA r = 64 on
    all linear layers, 4 sequences of at most 16 + 512 tokens per step, gradient checkpointing, bf16, paged
    32-bit AdamW; attention is eager (2023 transformers LLaMA). The paper does not say whether "48GB" is 10^9 or
    2^30 bytes, so both: everything but the paged optimizer state must fit 48 * 10^9 bytes, and the total with
    the optimizer state on the GPU 48 GiB (what a 48 GB card reports; we get 45.0 GiB, 39.0 without it). The >780GB is 16-bit full fine-tuning: bf16 weights and gradients and fp32 Adam m and v (12 bytes x
    65.3B = 783GB, the paper's figure to two digits), before the fp32 master copy mixed precision adds."""
    config = plan.size_config("65b")
    counts = plan.count_parameters(config, lora_r=64)
    rows = plan.plan_rows(config, counts, gpus=1, methods=("qlora", "full"), seq_len=16 + 512, batch=4,
                          attention="eager")
    qlora = next(r for r in rows if r.method == "qlora" and r.checkpointing)
    assert qlora.total < 48 * plan.GiB and qlora.fit(48 * plan.GiB) == "yes"
    assert qlora.total - qlora.optimizer < 48 * GB and qlora.fit(48 * GB) == "paged"
    full = next(r for r in rows if r.method == "full" and not r.checkpointing)
    without_master = full.weights + full.gradients + full.optimizer * 8 // 12
    assert 780 * GB < without_master < 790 * GB and full.total > 780 * GB

    single = plan.count_parameters(config, lora_r=64, double_quant=False)
    assert abs((single.nf4_bytes - counts.nf4_bytes) / GB - 3) < 0.1  # "approximately 3 GB": 3.02
    linear = sum(n for n in counts.units[:-1])  # every block parameter but the norms is an NF4 weight
    assert abs((single.nf4_bytes - counts.nf4_bytes) * 8 / linear - 0.373) < 0.001


def test_fsdp_divides_model_states_and_adds_one_gathered_unit():
    counts = plan.count_parameters(plan.size_config("7b"))
    for method in plan.METHODS:
        ddp = plan.states_per_gpu(counts, method, "ddp", 8)
        fsdp = plan.states_per_gpu(counts, method, "fsdp", 8)
        for part in ("weights", "gradients", "optimizer"):
            assert fsdp[part] == -(-ddp[part] // 8)
        assert ddp["buffers"] == 0 and fsdp["buffers"] > 0
    block = counts.units[0]  # full fine-tuning: two bf16 copies of the largest unit + its bf16 gradients
    assert plan.states_per_gpu(counts, "full", "fsdp", 8)["buffers"] == 6 * max(block, counts.units[-1])


def test_cli_plan_prints_every_combination_and_its_fit(capsys):
    assert main(["plan", "--model", "70b", "--gpus", "8", "--seq-len", "2048", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "Llama 2 70B" in out and "68.98B parameters" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in plan.METHODS]
    assert len(rows) == 12  # 3 methods x ddp/fsdp x checkpointing off/on
    fits = {(r[0], r[1], r[2]): r[-1] for r in rows}
    assert fits[("full", "ddp", "on")] == "no" and fits[("lora", "fsdp", "on")] == "yes"

    assert main(["plan", "--model", "7b", "--method", "qlora", "--format", "json", "--gpu-memory", "24"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gpus"] == 1 and {row["strategy"] for row in report["rows"]} == {"ddp"}
    assert all(row["total"] == row["weights"] + row["gradients"] + row["optimizer"] + row["activations"]
               + row["buffers"] for row in report["rows"])


def test_cli_plan_reads_config_json_and_gguf_headers_only(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}))
    assert main(["plan", "--model", str(tmp_path), "--method", "lora", "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("- ") and "MiB per GPU:\n\n| method |" in out and out.count("\n| lora |") == 2
    assert main(["plan", "--model", "smollm2-135m", "--method", "full"]) == 0  # a GGUF inside the wheel
    assert "134.5M parameters" in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [
    (["--model", "8b"], "--model '8b': not a size (7b, 13b, 33b, 65b, 70b)"),
    (["--model", "7b", "--gpus", "0"], "--gpus 0: must be >= 1"),
    (["--model", "7b", "--seq-len", "2k"], "--seq-len '2k': expected a whole number >= 1"),
    (["--model", "7b", "--batch", "-1"], "--batch -1: must be >= 1"),
    (["--model", "7b", "--method", "lora,dora"], "--method 'lora,dora': expected full|lora|qlora"),
    (["--model", "7b", "--gpu-memory", "0"], "--gpu-memory 0: must be a finite number of GiB > 0"),
    (["--model", "7b", "--gpu-memory", "lots"], "--gpu-memory 'lots': expected GiB per GPU"),
    (["--model", "7b", "--lora-targets", "qkv"], "--lora-targets: LoRA target 'qkv' matches no module"),
    (["--model", "7b", "--attention", "flash"], "--attention 'flash': expected sdpa or eager"),
    (["--model", "7b", "--format", "csv"], "--format 'csv': expected text, markdown, json"),
])
def test_cli_plan_bad_flags_are_one_line_errors(flags, message, capsys):
    assert main(["plan", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minift: error: " + message) and err.count("\n") == 1


def test_readme_scaling_table_is_what_the_script_prints():
    """README "Scaling out" quotes benchmarks/plan_scaling.py; a change to the formulas must regenerate it."""
    spec = importlib.util.spec_from_file_location("plan_scaling", ROOT / "benchmarks" / "plan_scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.readme_table()
    assert table in (ROOT / "README.md").read_text(), "rerun python benchmarks/plan_scaling.py and paste its table"
    assert table.count("\n") == 10  # header, rule, 3 sizes x 3 methods


def saved_per_layer(config_kwargs: dict, seq_len: int, batch: int) -> float:
    """Bytes autograd saves for the backward per transformer block of minift's own Transformer in bf16, SDPA:
    every saved tensor's storage counted once, parameters left out; (3 blocks - 1 block) / 2 removes what
    lies outside the blocks (embeddings, RoPE tables, final norm, logits)."""
    import torch

    from minift.model import Transformer

    def saved(n_layers: int) -> int:
        torch.manual_seed(0)
        model = Transformer(ModelConfig(n_layers=n_layers, **config_kwargs)).to(torch.bfloat16).train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(torch.randint(0, config_kwargs["vocab_size"], (batch, seq_len)))
        return sum(storages.values())

    return (saved(3) - saved(1)) / 2


@pytest.mark.parametrize("extra", [dict(n_kv_heads=4), dict(n_kv_heads=2),
                                   dict(n_kv_heads=2, model_type="qwen3", qk_norm=True, head_dim=48)],
                         ids=["mha", "gqa", "qwen3"])
def test_activation_count_is_what_minifts_llama_block_saves(extra):
    """The per-layer count (SDPA, fp32 RMSNorm, SwiGLU, grouped-query K and V, Qwen3's q/k norms) equals, byte
    for byte, what autograd keeps for minift's Llama-style block."""
    kwargs = dict(vocab_size=512, dim=128, n_heads=4, hidden_dim=320, **extra)
    expected = plan.layer_activation_bytes(ModelConfig(n_layers=1, **kwargs), 64, 2, "sdpa")
    assert saved_per_layer(kwargs, 64, 2) == expected


def test_activation_count_of_a_gpt_block_leaves_out_only_layernorm_statistics():
    """GPT-2 style block (LayerNorm, GELU MLP, biases, no dropout): Korthikanti's count leaves out LayerNorm's
    per-token mean and 1/std (2 norms x 2 values x s b in bf16 = 1,024 bytes here), nothing else."""
    kwargs = dict(model_type="gpt2", vocab_size=512, dim=128, n_heads=4, hidden_dim=512, norm="layer",
                  positions="learned", mlp="gelu", activation="gelu_tanh", qkv_bias=True, out_bias=True,
                  mlp_bias=True, tie_embeddings=True, max_seq_len=256)
    expected = plan.layer_activation_bytes(ModelConfig(n_layers=1, **kwargs), 64, 2, "sdpa")
    assert saved_per_layer(kwargs, 64, 2) - expected == 2 * 2 * 64 * 2 * 2


def test_fit_says_paged_only_for_qlora_whose_optimizer_state_alone_overflows():
    """Paged AdamW (QLoRA) moves its state to CPU memory under pressure; no other method's optimizer does."""
    def row(method):
        return plan.Row(method, "ddp", True, weights=40, gradients=2, optimizer=10, activations=4, buffers=0,
                        paged=method == "qlora")
    assert [row("qlora").fit(gpu) for gpu in (56, 50, 45)] == ["yes", "paged", "no"]
    assert [row("lora").fit(gpu) for gpu in (56, 50, 45)] == ["yes", "no", "no"]


def test_parameter_and_adapter_counts_equal_transformers_and_peft(tmp_path):
    """The counts behind every row, against the reference libraries: a Llama with grouped-query attention and
    a GPT-2 written as config.json, built by transformers; LoRA on every linear layer and on q,v by PEFT. (Only
    the Llama's adapters: minift splits GPT-2's fused c_attn into q, k, v projections and so gives each its own
    A and B, 3 r (h + h) per layer where PEFT's one adapter on c_attn has r (h + 3h).)"""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    configs = {
        "llama": transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2),
        "gpt2": transformers.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=128),
    }
    for name, hf_config in configs.items():
        folder = tmp_path / name
        folder.mkdir()
        hf_config.to_json_file(folder / "config.json")
        config, _ = plan.resolve_config(str(folder))
        assert plan.count_parameters(config).total == transformers.AutoModelForCausalLM.from_config(
            hf_config).num_parameters()
        if name == "llama":
            for targets in ("all-linear", ["q_proj", "v_proj"]):
                lora = peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(hf_config),
                                           peft.LoraConfig(r=8, target_modules=targets))
                trainable, _ = lora.get_nb_trainable_parameters()
                assert plan.count_parameters(config, 8, targets).adapters == trainable, targets


@pytest.mark.parametrize("tied", [False, True])
def test_qlora_base_bytes_equal_a_model_quantized_by_minift(tied):
    """The QLoRA weights column is what minift.quant.quantize_model leaves: NF4 linear layers (double
    quantization, 64-blocks; bit-exact with bitsandbytes elsewhere) and the rest in bf16, byte for byte."""
    import torch

    from minift.model import Transformer
    from minift.quant import quantize_model

    config = ModelConfig(vocab_size=1000, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=320,
                         tie_embeddings=tied)
    model = Transformer(config).to(torch.bfloat16)
    report = quantize_model(model)
    assert plan.count_parameters(config).nf4_bytes == report.model_bytes
