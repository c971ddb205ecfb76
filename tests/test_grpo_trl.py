"""minift's GRPO step against TRL 1.16's GRPOTrainer + PEFT on the same weights and the same completions.

The benchmark (benchmarks/bench_grpo.py) lets each library draw its own LoRA A and its own samples, so its KL
figures differ by chance (benchmarks/bench_grpo_kl.py measures by how much); here nothing is left to chance. A tiny
random Llama folder is loaded by transformers (TRL, with a PEFT LoRA on q_proj / v_proj) and by minift
(`[task] kind = "grpo"`, method lora). minift's LoRA A is set to PEFT's, and B to the same random values on both
sides, so the policy is not the reference and the KL term is not zero. TRL samples the completions
(`_generate_and_score_completions`, at temperature 0.7, so the division of the logits by the temperature is
exercised); minift is handed the very same token ids (GRPOTaskModel.rollout_of). Then, number for number: the
completion mask (cut after the first EOS), the reference's per-token log-probs (adapters off), the policy's, the
advantages, the loss, the gradient of every LoRA tensor, TRL's kl, reward and reward_std metrics; and the same again
after an AdamW step on each side. That holds with TRL's use_bias_correction_kl = False; its default, True, is
checked to be the gradient of k3 x ratio, written out.
"""

import json

import pytest
import torch

import minift
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)

WORDS = "sun rain wind snow cloud storm fog hail mist frost ice heat dew gale sky".split()
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
P, G, C = 2, 3, 6  # prompts, completions per prompt, max new tokens
BETA, EPSILON, TEMPERATURE, LR = 0.3, 0.2, 0.7, 1e-2


def reward(prompts, completions, **_):
    """How many weather words of the first half of WORDS the completion has (TRL passes keyword arguments)."""
    return [float(sum(w in WORDS[:7] for w in c.split())) for c in completions]


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    import datasets
    import peft
    import transformers
    import trl
    from tokenizers import Tokenizer, models, pre_tokenizers

    from minift.peft.peft_format import hf_module_path
    from minift.train.loop import build_optimizer, build_trainable_model
    from minift.train.rl_data import load_rl_datasets, prepare_align_run
    from minift.train.run_config import RunConfig, apply_override

    root = tmp_path_factory.mktemp("grpo_trl")
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>",
                                                        pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    hf_tokenizer.save_pretrained(root / "model")
    data = [{"prompt": "sun rain wind snow"}, {"prompt": "fog hail mist"}]  # two lengths: left padding
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))

    args = trl.GRPOConfig(output_dir=str(root / "trl"), report_to="none", use_cpu=True, save_strategy="no",
                          per_device_train_batch_size=P * G, gradient_accumulation_steps=1, num_generations=G,
                          max_completion_length=C, num_iterations=1, beta=BETA, epsilon=EPSILON, loss_type="grpo",
                          scale_rewards="group", temperature=TEMPERATURE, top_p=1.0, top_k=0, use_vllm=False,
                          bf16=False, learning_rate=LR, weight_decay=0.0, seed=0, use_bias_correction_kl=False)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                           task_type="CAUSAL_LM")
    trainer = trl.GRPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(root / "model"),
                              reward_funcs=[reward], args=args, peft_config=lora,
                              train_dataset=datasets.Dataset.from_list(data), processing_class=hf_tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before its first step
    theirs = trainer.model.train()

    run_config = RunConfig()
    for item in ("task.kind=grpo", f"task.beta={BETA}", f"task.group_size={G}", f"task.max_new_tokens={C}",
                 f"task.temperature={TEMPERATURE}", f"task.clip_range={EPSILON}",
                 "task.reward_function=tests.test_grpo_trl:reward", f"data.train={root / 'prompts.jsonl'}",
                 "data.validation_fraction=0", "method.name=lora", "method.r=4", "method.alpha=8", f"train.lr={LR}",
                 "train.device=cpu", f"train.batch_size={P}"):
        apply_override(run_config, item)
    backbone, tokenizer = minift.load(root / "model")
    ours, _, _ = build_trainable_model(run_config, backbone, None)
    ours.train()
    stream, _, _ = load_rl_datasets(run_config, tokenizer)
    prepare_align_run(ours, stream, None, run_config, tokenizer)

    # the same adapter on both sides: PEFT's A, and one random B (so the policy is not the reference)
    theirs_params = dict(theirs.named_parameters())
    pairs = []  # (minift parameter, PEFT parameter)
    g = torch.Generator().manual_seed(1)
    for name, p in ours.named_parameters():
        if not p.requires_grad:
            continue
        module, _, leaf = name.removeprefix("backbone.").partition(".lora_")
        peft_name = f"base_model.model.{hf_module_path(module, 'llama')}.lora_{leaf}"
        q = theirs_params[peft_name]
        with torch.no_grad():
            if leaf.startswith("B"):
                q.copy_(torch.randn(q.shape, generator=g) * 0.3)
            p.copy_(q)
        pairs.append((p, q))
    assert len(pairs) == sum(q.requires_grad for q in theirs.parameters()) == 8  # 2 layers x (q, v) x (A, B)
    optimizers = (build_optimizer([[p for p, _ in pairs]], run_config.train, torch.device("cpu")),
                  torch.optim.AdamW([q for _, q in pairs], lr=LR, weight_decay=0.0))
    return dict(trainer=trainer, ours=ours, stream=stream, tokenizer=tokenizer, pairs=pairs, data=data,
                optimizers=optimizers)


def rollout_pair(s):
    """TRL samples a rollout (its `_generate_and_score_completions`); minift's rollout batch of the same token ids."""
    trainer, ours, tokenizer = s["trainer"], s["ours"], s["tokenizer"]
    theirs = trainer._generate_and_score_completions([r for r in s["data"] for _ in range(G)])
    prompts, texts = s["stream"].collate(s["stream"].prompts)
    prompt_ids = prompts["input_ids"].repeat_interleave(G, 0)
    prompt_mask = prompts["attention_mask"].repeat_interleave(G, 0)
    assert torch.equal(prompt_ids, theirs["prompt_ids"]) and torch.equal(prompt_mask, theirs["prompt_mask"])
    batch = ours.rollout_of(prompt_ids, prompt_mask, theirs["completion_ids"], texts, tokenizer)
    assert torch.equal(batch["completion_mask"], theirs["completion_mask"])  # the same cut after the first EOS
    return batch, theirs


def backward(loss, params) -> list[torch.Tensor]:
    """The gradients of `loss` for `params`, read and cleared."""
    loss.backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


def one_iteration(s):
    """Rollout (TRL's samples), logps, loss, metrics and gradients on both sides, then one AdamW step each."""
    batch, theirs = rollout_pair(s)
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(batch["reference_logps"][mask], theirs["ref_per_token_logps"][mask], rtol=0, atol=2e-6)
    torch.testing.assert_close(batch["advantages"], theirs["advantages"], rtol=0, atol=1e-6)
    return batch, one_step(s, batch, theirs)


def one_step(s, batch, theirs):
    """One optimizer step on each side on the given rollout: logps, loss, metrics, gradients, then AdamW."""
    from minift.train.rl_tasks import policy_outputs

    trainer, ours, pairs = s["trainer"], s["ours"], s["pairs"]
    mask = batch["completion_mask"].bool()
    with torch.no_grad():  # the policy's log-probs: both divide the logits by the temperature
        ids = torch.cat([theirs["prompt_ids"], theirs["completion_ids"]], 1)
        attention = torch.cat([theirs["prompt_mask"], theirs["completion_mask"]], 1)
        theirs_logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, mask.size(1))
        torch.testing.assert_close(policy_outputs(ours.backbone, batch, TEMPERATURE)["logps"][mask],
                                   theirs_logps[mask], rtol=0, atol=2e-6)
    out = ours(batch)
    (out.loss_sum / out.n_targets).backward()
    theirs_loss = trainer.compute_loss(trainer.model, theirs)
    theirs_loss.backward()
    assert float(out.loss_sum.detach()) / out.n_targets == pytest.approx(float(theirs_loss.detach()), abs=1e-6)
    for p, q in pairs:
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7)
    metrics = trainer._metrics["train"]
    for name in ("kl", "reward", "reward_std"):  # as minift's loop logs them: the sum over the rollout / N
        assert out.metric_sums[name] / out.n_targets == pytest.approx(metrics[name][-1], rel=1e-5, abs=1e-9), name
    for optimizer in s["optimizers"]:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return out


def test_grpo_iterations_equal_trl_without_the_kl_bias_correction(sides):
    """use_bias_correction_kl = False: minift's GRPO is TRL's, over two iterations with an AdamW step after each."""
    torch.manual_seed(3)  # TRL samples with the global generator
    lengths = []
    for _ in range(2):
        batch, out = one_iteration(sides)
        lengths.append(batch["completion_mask"].sum(1).tolist())
    assert len(set(lengths[0])) > 1  # some completions ended early: kl's token mean is not the sequence mean
    assert out.metric_sums["kl"] > 0


def test_num_iterations_2_equals_trl(sides):
    """num_iterations = 2 (GRPO's mu): TRL keeps the sampling policy's log-probs (old_per_token_logps) and takes two
    steps on one rollout; minift's rollout holds the same old_logps, and both steps (loss, gradients, weights) equal
    TRL's. At the second step the policy has moved, so the ratio is no longer 1."""
    from minift.train.rl_tasks import policy_outputs

    trainer, ours, pairs = sides["trainer"], sides["ours"], sides["pairs"]
    trainer.num_iterations, ours.options.num_iterations = 2, 2  # what GRPOConfig(num_iterations=2) sets
    try:
        torch.manual_seed(5)
        batch, theirs = rollout_pair(sides)
    finally:
        trainer.num_iterations, ours.options.num_iterations = 1, 1
    mask = batch["completion_mask"].bool()
    assert "old_per_token_logps" in theirs
    torch.testing.assert_close(batch["old_logps"][mask], theirs["old_per_token_logps"][mask], rtol=0, atol=2e-6)
    one_step(sides, batch, theirs)
    with torch.no_grad():
        ratio = torch.exp(policy_outputs(ours.backbone, batch, TEMPERATURE)["logps"] - batch["old_logps"])[mask]
    assert float((ratio - 1).abs().max()) > 1e-3  # the second step's ratio is not 1
    one_step(sides, batch, theirs)
    for p, q in pairs:  # the weights after both steps
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_trl_default_kl_bias_correction_is_k3_times_the_ratio(sides):
    """TRL 1.16's default use_bias_correction_kl = True: the same loss, and the gradient of k3 x ratio; it parts
    from minift's (k3's) only at second order in log pi - log pi_ref."""
    trainer, ours, pairs = sides["trainer"], sides["ours"], sides["pairs"]
    torch.manual_seed(4)
    batch, theirs = rollout_pair(sides)
    mask = batch["completion_mask"].float()
    trainer.args.use_bias_correction_kl = True
    try:
        theirs_loss = trainer.compute_loss(trainer.model, theirs)
        theirs_grads = backward(theirs_loss, [q for _, q in pairs])
    finally:
        trainer.args.use_bias_correction_kl = False
    out = ours(batch)
    ours_grads = backward(out.loss_sum / out.n_targets, [p for p, _ in pairs])
    from minift.train.rl_tasks import policy_outputs

    logps = policy_outputs(ours.backbone, batch, TEMPERATURE)["logps"]
    ratio = torch.exp(logps - logps.detach())
    A, d = batch["advantages"][:, None], batch["reference_logps"] - logps
    per_token = -torch.min(ratio * A, ratio.clamp(1 - EPSILON, 1 + EPSILON) * A) + BETA * (d.exp() - d - 1) * ratio
    corrected = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    assert float(corrected.detach()) == pytest.approx(float(theirs_loss.detach()), abs=1e-6)
    assert float(out.loss_sum.detach()) / out.n_targets == pytest.approx(float(theirs_loss.detach()), abs=1e-6)
    for theirs_grad, corrected_grad, ours_grad in zip(theirs_grads, backward(corrected, [p for p, _ in pairs]),
                                                      ours_grads):
        torch.testing.assert_close(theirs_grad, corrected_grad, rtol=1e-4, atol=1e-7)
    difference = sum(float((a - b).norm()) for a, b in zip(theirs_grads, ours_grads))
    assert 0 < difference < 0.1 * sum(float(g.norm()) for g in ours_grads)  # real, and small at this KL
