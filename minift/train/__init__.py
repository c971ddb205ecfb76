"""minift.train: the training engine — one loop that every method, task and tutorial goes through.

    fields.py       TOML values and --set strings -> typed dataclass fields, with did-you-mean errors
    methods.py      the one method registry: [method] name -> typed options -> which weights train
    tasks.py        what is learned: causal LM, masked LM, classification (the head and the loss)
    preference_tasks.py   reward model and DPO as tasks (the pair loss, the reference, the export)
    rl_tasks.py     GRPO and PPO as tasks: rollouts with `generate`, rewards, advantages, the clipped losses
    run_config.py   RunConfig: the [model] [task] [data] [train] [method] tables of a TOML file, validated
    batches.py      records -> token ids -> padded / packed micro-batches, in a resumable order
    preference_data.py    {prompt, chosen, rejected} records -> pair batches, precomputed reference log-probs
    rl_data.py      prompts -> rollouts the policy writes, in a resumable order (PPO's kept in the checkpoint)
    checkpoint.py   atomic checkpoints: weights, optimizer, schedule, RNG, data position
    guards.py       stopping safely: one run per folder (run.lock), Ctrl-C, divergence
    distributed.py  several processes: torchrun, DDP, FSDP2, sharded checkpoints (torch.distributed.checkpoint)
    compiled.py     train.compile: torch.compile per transformer block, compile seconds logged apart
    optimizer_in_backward.py   each weight's AdamW step inside backward, its gradient freed at once
    loop.py         setup -> fit -> evaluate

    from minift.train import setup, fit
    from minift.train.run_config import load_run_config
    run = setup(load_run_config("configs/lora_sft_alpaca.toml", ["train.max_steps=20"]))
    fit(run)
"""

from minift.train.guards import DivergenceError, RunLockedError, TrainingInterrupted
from minift.train.loop import (
    NonFiniteLossError,
    Run,
    accumulate_gradients,
    build_optimizer,
    eval_batches,
    evaluate,
    fit,
    load_trained,
    optimizer_step,
    read_metrics,
    resolve_device,
    setup,
)
