"""Every config field is checked before a model loads, and a run's folder is checked before work starts.

minift/train/run_config.py (validate_run_config and the rule table after each section), setup()'s output
folder checks (minift/io/files.py check_output_dir, minift/train/checkpoint.py clean_interrupted_writes),
a full disk while writing a checkpoint or an export, and the modes of the files a run writes. Each bad value
is tried through load_run_config and through `minift finetune` in this process: exit 2, exactly one line
`minift: error: ...` naming the field. Tiny models from tests/train_helpers.py; nothing real is loaded.
"""

import errno
import os
import re
from pathlib import Path

import pytest
import torch

from minift.cli import main
from minift.io import files
from minift.io.files import WriteError, check_output_dir, write_safetensors_atomic
from minift.train import checkpoint as ckpt
from minift.train import setup
from minift.train.fields import field_names
from minift.train.run_config import RULES, RunConfig, load_run_config, validate_run_config
from tests.train_helpers import (SENTENCES, SENTIMENT, run_config, save_tiny_decoder, tiny_encoder, word_tokenizer,
                                 write_jsonl)
from tests.train_helpers import single_thread  # noqa: F401  (autouse fixture: one torch thread)

# (--set override, what the one line must say). The base file below is valid; each row breaks one field.
BAD_VALUES = [
    ("train.log_every=0", r"train\.log_every = 0; must be >= 1"),
    ("train.log_every=-2", r"train\.log_every = -2; must be >= 1"),
    ("train.save_every=-1", r"train\.save_every = -1; must be >= 0 \(0 = only at the end\)"),
    ("train.eval_every=-5", r"train\.eval_every = -5; must be >= 0"),
    ("train.max_grad_norm=-1", r"train\.max_grad_norm = -1\.0; must be > 0 \(none turns clipping off\)"),
    ("train.max_grad_norm=0", r"train\.max_grad_norm = 0\.0; must be > 0"),
    ("data.validation_fraction=1", r"data\.validation_fraction = 1\.0; must be in \[0, 1\)"),
    ("data.validation_fraction=-0.1", r"data\.validation_fraction = -0\.1; must be in \[0, 1\)"),
    ("data.max_length=0", r"data\.max_length = 0; must be >= 1"),
    ("train.epochs=0", r"train\.epochs = 0\.0; must be > 0"),
    ("train.epochs=-1", r"train\.epochs = -1\.0; must be > 0"),
    ("train.epochs=nan", r"train\.epochs = nan; must be a finite number"),
    ("train.lr=inf", r"train\.lr = inf; must be a finite number"),
    ("train.lr=0", r"train\.lr = 0\.0; must be > 0"),
    ("train.weight_decay=-0.01", r"train\.weight_decay = -0\.01; must be >= 0"),
    ("task.mlm_probability=0", r"task\.mlm_probability = 0\.0; must be in \(0, 1\)"),
    ("task.mlm_probability=1", r"task\.mlm_probability = 1\.0; must be in \(0, 1\)"),
    ("model.dropout=1", r"model\.dropout = 1\.0; must be in \[0, 1\)"),
    ("model.dropout=-0.1", r"model\.dropout = -0\.1; must be in \[0, 1\)"),
    ("task.head_dropout=1.5", r"task\.head_dropout = 1\.5; must be in \[0, 1\)"),
    ("train.adam_beta1=1", r"train\.adam_beta1 = 1\.0; must be in \[0, 1\)"),
    ("train.adam_beta2=-0.5", r"train\.adam_beta2 = -0\.5; must be in \[0, 1\)"),
    ("train.adam_eps=0", r"train\.adam_eps = 0\.0; must be > 0"),
    ("train.device=gpu", r"train\.device = 'gpu'; must be auto or a device torch knows"),
    ("train.device=cuda:x", r"train\.device = 'cuda:x'; must be auto or a device torch knows"),
    ("model.dtype=fp8", r"model\.dtype = 'fp8'; must be one of float32, bfloat16, float16"),
    ("model.dtype=bfloat", r"model\.dtype = 'bfloat'; must be one of .* \(did you mean 'bfloat16'\?\)"),
    ("train.precision=fp64", r"train\.precision = 'fp64'; must be one of fp32, bf16, fp16"),
    ("train.schedule=linear", r"train\.schedule = 'linear'; must be one of .*constant"),
    ("task.kind=seq2seq", r"task\.kind = 'seq2seq'; must be one of causal_lm, masked_lm, classification"),
    ("task.kind=dpo", r"task\.kind = 'dpo'; must be one of .* \('dpo' is called 'preference' here\)"),
    ("task.kind=SFT", r"task\.kind = 'SFT'; must be one of .* \('SFT' is called 'causal_lm' here\)"),
    ("data.format=json", r"data\.format = 'json'; must be one of text, prompt_completion, alpaca, chat"),
    ("task.pooling=max", r"task\.pooling = 'max'; must be one of mean, cls, last"),
    ("train.gradual_unfreezing=-1", r"train\.gradual_unfreezing = -1; must be >= 0 \(0 = off\)"),
    ("train.layer_groups=0", r"train\.layer_groups = 0; must be >= 1"),
    ("train.warmup_steps=-1", r"train\.warmup_steps = -1; must be >= 0"),
    ("train.cut_frac=0", r"train\.cut_frac = 0\.0; must be in \(0, 1\)"),
    ("train.cut_frac=1", r"train\.cut_frac = 1\.0; must be in \(0, 1\)"),
    ("train.stlr_ratio=0.5", r"train\.stlr_ratio = 0\.5; must be >= 1"),
    ("train.discriminative_factor=0", r"train\.discriminative_factor = 0\.0; must be > 0"),
    ("train.keep_checkpoints=0", r"train\.keep_checkpoints = 0; must be >= 1"),
    ("train.batch_size=0", r"train\.batch_size = 0; must be >= 1"),
    ("train.grad_accum_steps=0", r"train\.grad_accum_steps = 0; must be >= 1"),
    ("train.max_steps=0", r"train\.max_steps = 0; must be >= 1"),
    ("train.seed=-1", r"train\.seed = -1; must be >= 0"),
    ("train.early_stopping_patience=-1", r"train\.early_stopping_patience = -1; must be >= 0"),
    ("train.early_stopping_metric=accuracy", r"early_stopping_metric = 'accuracy'.*did you mean 'eval_accuracy'"),
    ("train.early_stopping_metric=eval_accuracy",
     r"train\.early_stopping_metric = 'eval_accuracy', but a causal_lm task reports eval_loss and eval_perplexity"),
    ("task.labels=pos,neg,pos", r"task\.labels = \['pos', 'neg', 'pos'\]; must be at least 2 distinct"),
    ("task.labels=pos", r"task\.labels = \['pos'\]; must be at least 2 distinct"),
    ("data.max_examples=0", r"data\.max_examples = 0; must be >= 1"),
    ("data.max_eval_examples=-1", r"data\.max_eval_examples = -1; must be >= 0"),
    ("data.text_field=", r"data\.text_field = ''; must be a non-empty string"),
    ("data.train=", r"data\.train = ''; must be a non-empty string"),
    ("train.output_dir=", r"train\.output_dir = ''; must be a non-empty string"),
    ("model.source= ", r"model\.source = ''; must be a non-empty string"),
]


@pytest.fixture
def base_config(tmp_path) -> Path:
    """A valid config (loading it would fetch the bundled model; every test here fails before that)."""
    path = tmp_path / "run.toml"
    path.write_text(f'[data]\ntrain = "tweet-sentiment"\n[train]\noutput_dir = "{tmp_path / "out"}"\n')
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minift: error: "), err
    return err[0]


def test_the_base_config_is_valid(base_config):
    config = load_run_config(base_config)
    assert config.data.train == "tweet-sentiment" and config.train.max_grad_norm == 1.0


def test_every_field_but_a_switch_has_a_range_rule():
    """A new field must come with its rule (true/false switches need none: their type is their range)."""
    config = RunConfig()
    for section, rules in RULES.items():
        target = getattr(config, section)
        for name in field_names(target):
            if not isinstance(getattr(target, name), bool):
                assert name in rules, f"{section}.{name} has no rule in run_config.RULES"
        assert set(rules) <= set(field_names(target)), f"[{section}] rules name fields it does not have"


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_naming_the_field(base_config, override, message, capsys):
    with pytest.raises(ValueError, match=message) as error:
        load_run_config(base_config, [override])
    assert str(error.value).startswith("--set: ")  # the value came from the command line, not the file
    assert main(["finetune", str(base_config), "--set", override]) == 2  # before any model is loaded
    line = one_error_line(capsys)
    assert line == f"minift: error: {error.value}"


@pytest.mark.parametrize("table, message", [
    ("[train]\nmax_grad_norm = -1.0", r"train\.max_grad_norm = -1\.0; must be > 0"),
    ("[train]\nepochs = nan", r"train\.epochs = nan; must be a finite number"),
    ("[train]\nadam_beta2 = inf", r"train\.adam_beta2 = inf; must be a finite number"),
    ('[model]\ndtype = "float64"', r"model\.dtype = 'float64'; must be one of"),
    ('[task]\nlabels = ["a", "b", "a"]', r"task\.labels = \['a', 'b', 'a'\]"),
    ('[task]\nkind = "classification"\n[train]\nearly_stopping_metric = "eval_perplexity"',
     r"classification task reports eval_loss and eval_accuracy"),
    # grpo/ppo evaluations report no perplexity: accepting it would make early stopping silently never stop
    ('[task]\nkind = "grpo"\nreward_function = "m:f"\n[train]\nearly_stopping_metric = "eval_perplexity"',
     r"grpo task reports eval_loss only; use eval_loss"),
    ('[task]\nkind = "preference"\n[train]\nearly_stopping_metric = "eval_accuracy"',
     r"preference task reports eval_loss only; use eval_loss"),
])
def test_a_bad_value_in_a_file_names_the_file(tmp_path, table, message, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(f'[data]\ntrain = "tweet-sentiment"\n{table}\n')
    with pytest.raises(ValueError, match=message) as error:
        load_run_config(path)
    assert str(error.value).startswith(f"{path}: ")
    assert main(["finetune", str(path)]) == 2
    assert one_error_line(capsys) == f"minift: error: {error.value}"


def test_setup_validates_a_config_built_in_code_before_loading_anything(tmp_path):
    config = RunConfig()
    config.data.train, config.train.output_dir = "tweet-sentiment", str(tmp_path / "out")
    config.model.source = str(tmp_path / "no-such-model")  # loading it would fail with another error
    config.train.log_every = 0
    with pytest.raises(ValueError, match=r"^config: train\.log_every = 0; must be >= 1$"):
        setup(config)
    config.train.log_every, config.train.lr = 1, "fast"  # a wrong type, as only code can write it
    with pytest.raises(ValueError, match=r"^config: train\.lr: expected float, got 'fast'$"):
        setup(config)
    config.train.lr, config.train.epochs = 1e-3, 2  # an int for a float field is converted, as --set does
    validate_run_config(config)
    assert type(config.train.epochs) is float
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# Labels in the data
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label, shown", [(["positive"], "a list"), ({"name": "positive"}, "a JSON object"),
                                          (None, "null")])
def test_a_label_that_is_not_one_name_is_an_error_naming_file_and_line(tmp_path, label, shown):
    records = SENTIMENT[:2] + [{"text": "i love this", "label": label}] + SENTIMENT[2:]
    data = write_jsonl(tmp_path / "labels.jsonl", records)
    tokenizer = word_tokenizer([r["text"] for r in SENTIMENT], encoder=True)
    for labels in ([], ["task.labels=positive,negative"]):  # labels read from the data, or given in [task]
        config = run_config("tiny", data, tmp_path / "out", "task.kind=classification", *labels)
        message = rf"labels\.jsonl:3: field 'label' is {shown}\b.*; a label must be one class name"
        with pytest.raises(ValueError, match=message):
            setup(config, model=tiny_encoder(tokenizer.vocab_size), tokenizer=tokenizer)


# ----------------------------------------------------------------------------------------------------
# The output folder
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory) -> Path:
    return save_tiny_decoder(tmp_path_factory.mktemp("tiny") / "decoder")


def finetune_args(model_dir: Path, data: Path, out: Path, *sets: str) -> list[str]:
    settings = [f"model.source={model_dir}", f"data.train={data}", f"train.output_dir={out}", "train.device=cpu",
                "train.progress_bar=false", "train.batch_size=4", "train.lr=3e-3", "data.validation_fraction=0",
                *sets]
    config = data.with_name("run.toml")
    config.write_text("# every setting is given with --set\n")
    return ["finetune", str(config), *[x for s in settings for x in ("--set", s)]]


@pytest.fixture
def text_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])


def test_an_output_dir_that_is_a_file_fails_before_the_model_loads(tmp_path, text_data, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    config = run_config(tmp_path / "no-such-model", text_data, taken)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(taken))}: train\.output_dir is an existing file"):
        setup(config)  # the missing model would be a different error: the folder is checked first
    below = taken / "run"
    with pytest.raises(ValueError, match=re.escape(f"{below}: train.output_dir cannot be created, {taken} is a file")):
        setup(run_config(tmp_path / "no-such-model", text_data, below))
    config_file = tmp_path / "run.toml"
    config_file.write_text('[data]\ntrain = "tweet-sentiment"\n')
    assert main(["finetune", str(config_file), "--set", f"train.output_dir={taken}"]) == 2
    assert f"{taken}: train.output_dir is an existing file" in one_error_line(capsys)


def test_an_output_dir_in_a_read_only_place_fails_before_the_model_loads(tmp_path, text_data):
    if os.geteuid() != 0:  # a folder without write permission stops anyone but root
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            message = re.escape(f"{locked / 'run'}: train.output_dir is not writable ({locked}")
            with pytest.raises(ValueError, match=message):
                setup(run_config(tmp_path / "no-such-model", text_data, locked / "run"))
        finally:
            locked.chmod(0o755)
    proc = Path("/proc")  # refuses new files even to root, although os.access says it is writable
    if not (proc / "self").exists():
        pytest.skip("no /proc on this system")
    with pytest.raises(ValueError, match=r"^/proc/minift-run: train\.output_dir is not writable \(/proc, where it "
                                         r"would be created, refuses new files"):
        setup(run_config(tmp_path / "no-such-model", text_data, proc / "minift-run"))
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # the check creates nothing


def test_leftover_tmp_folders_are_removed_at_the_next_start_with_a_note(tmp_path, decoder_dir, text_data, capsys):
    out = tmp_path / "run"
    partial = out / "checkpoints" / "step-000001.tmp"  # a first checkpoint interrupted halfway: no checkpoint yet
    partial.mkdir(parents=True)
    (partial / "weights.safetensors").write_bytes(b"half")
    (out / "checkpoints" / "latest.json.tmp").write_text("{")
    assert main(finetune_args(decoder_dir, text_data, out, "train.max_steps=2", "train.save_every=1",
                              "train.export=false")) == 0
    err = capsys.readouterr().err
    assert f"minift: note: removed {out / 'checkpoints' / 'latest.json.tmp'}, left over" in err
    assert f"minift: note: removed {partial}, left over from an interrupted write" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.json", "step-000001", "step-000002"]

    late = out / "checkpoints" / "step-000003.tmp"  # a kill while writing a later checkpoint, then --resume
    late.mkdir()
    (late / "rng.safetensors.tmp").write_bytes(b"")
    assert main(["finetune", "--resume", str(out), "--set", "train.max_steps=3"]) == 0
    assert f"minift: note: removed {late}" in capsys.readouterr().err
    assert ckpt.latest_checkpoint(out) == out / "checkpoints" / "step-000003"
    assert not list(out.rglob("*.tmp"))


# ----------------------------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------------------------


def full_disk_when(monkeypatch, condition, before=lambda: None):
    """Make the safetensors writer fail with ENOSPC for the files `condition(path)` picks."""
    real = files.save_file

    def save_file(tensors, filename, metadata=None):
        if condition(str(filename)):
            before()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(files, "save_file", save_file)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_full_disk_while_checkpointing_leaves_the_previous_checkpoint_intact(tmp_path, decoder_dir, text_data,
                                                                             monkeypatch, capsys):
    out = tmp_path / "run"
    first, second = out / "checkpoints" / "step-000001", out / "checkpoints" / "step-000002"
    snapshot = {}
    # The disk fills up after step 2's weights are written, at its optimizer state.
    full_disk_when(monkeypatch, lambda name: "step-000002" in name and "optimizer" in name,
                   before=lambda: snapshot.update(folder_bytes(first)))
    assert main(finetune_args(decoder_dir, text_data, out, "train.max_steps=3", "train.save_every=1")) == 2
    line = one_error_line(capsys)
    assert line == (f"minift: error: {second}: could not write the checkpoint (No space left on device); the previous "
                    f"checkpoint {first} is intact; free some space and resume with --resume {out}")
    assert snapshot and folder_bytes(first) == snapshot  # really intact: every byte as it was
    assert not second.exists() and not (out / "checkpoints" / "step-000002.tmp").exists()
    assert ckpt.latest_checkpoint(out) == first
    monkeypatch.undo()  # space freed: the run resumes from the intact checkpoint and finishes
    assert main(["finetune", "--resume", str(out)]) == 0
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(out)).step == 3


def test_a_full_disk_with_no_earlier_checkpoint_says_so(tmp_path, decoder_dir, text_data, monkeypatch, capsys):
    out = tmp_path / "run"
    full_disk_when(monkeypatch, lambda name: "step-000001" in name)
    assert main(finetune_args(decoder_dir, text_data, out, "train.max_steps=1")) == 2
    assert one_error_line(capsys).endswith("(No space left on device); there is no earlier checkpoint to resume "
                                           "from; free some space and start again")
    assert not list((out / "checkpoints").iterdir())


def test_a_full_disk_while_exporting_names_the_export_and_the_intact_checkpoint(tmp_path, decoder_dir, text_data,
                                                                               monkeypatch, capsys):
    out = tmp_path / "run"
    full_disk_when(monkeypatch, lambda name: f"{os.sep}final{os.sep}" in name)
    assert main(finetune_args(decoder_dir, text_data, out, "train.max_steps=2")) == 2
    last = out / "checkpoints" / "step-000002"
    assert one_error_line(capsys) == (
        f"minift: error: {out / 'final'}: could not write the exported model (No space left on device); the last "
        f"checkpoint {last} is intact; free some space and export it with `minift export --run {out} --out DIR`")
    assert ckpt.load_checkpoint(last).step == 2
    assert not list(out.rglob("*.tmp"))


def test_an_io_error_inside_safetensors_is_an_oserror_naming_the_file(tmp_path):
    target = tmp_path / "missing-folder" / "x.safetensors"  # safetensors itself fails: no such folder
    with pytest.raises(FileNotFoundError, match="x.safetensors") as error:
        write_safetensors_atomic({"a": torch.zeros(2)}, target)
    assert error.value.errno == errno.ENOENT
    assert issubclass(WriteError, OSError) and issubclass(WriteError, ValueError)


# ----------------------------------------------------------------------------------------------------
# File modes follow the umask
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_safetensors_files_get_the_mode_open_would_give(tmp_path, umask, mask):
    umask(mask)
    path = write_safetensors_atomic({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    write_safetensors_atomic({"a": torch.ones(2)}, path)  # overwriting too
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_every_checkpoint_and_export_file_is_readable_by_others(tmp_path, decoder_dir, text_data, umask):
    umask(0o022)
    out = tmp_path / "run"
    assert main(finetune_args(decoder_dir, text_data, out, "train.max_steps=1")) == 0
    written = [p for folder in ("checkpoints", "final") for p in (out / folder).rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in written) and any(p.name == "weights.safetensors" for p in written)
    modes = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in written}
    assert set(modes.values()) == {"0o644"}, modes
