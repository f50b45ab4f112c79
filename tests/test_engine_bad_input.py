"""Bad input, kind by kind: each stops with ONE line saying what was wrong and what to do, a non-zero exit code
(faults.ExitCode), and nothing lost: no run replaced, nothing half-written, no non-finite checkpoint.

The launcher's refusals (`pcmoe train`, exit 2, before any party starts) and one party's (`python -m
pcmoe_engine.train` with parties=1, in this process) are here; what needs several party processes is in
test_engine_faults.py.
"""

import gzip
import hashlib
import json
import re

import pytest
import torch

from pcmoe_engine.checkpoint import check_run_dir
from pcmoe_engine.cli import main as pcmoe
from pcmoe_engine.config import load_config
from pcmoe_engine.faults import ExitCode
from pcmoe_engine.train import main as party

SMALL = ["model.hidden_size=32", "model.num_layers=2", "model.expert_intermediate_size=32", "data.seq_len=16",
         "train.batch_size=2", "train.warmup_steps=1", "train.eval_batches=1", "train.log_every=100"]


@pytest.fixture(autouse=True)
def _engine(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PCMOE_CACHE", str(tmp_path_factory.getbasetemp() / "pcmoe-cache"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the engine on a CPU runs csrc_triton's references


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def _snapshot(folder):
    """Every file under ``folder`` and a digest of its bytes: what must not change."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(capsys, code, info, message):
    assert info.value.code == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pcmoe: error"), err
    assert message in err, err
    return err


def _train_one_party(tmp_path, *overrides, name="run"):
    party(_sets(["parties=1", *SMALL, f"train.out_dir={tmp_path}", f"train.name={name}", *overrides]))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-party run: 4 steps, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PCMOE_CACHE", str(tmp_path_factory.getbasetemp() / "pcmoe-cache"))
        env.delenv("TRITON_INTERPRET", raising=False)
        _train_one_party(out, "train.steps=4", "train.checkpoint_every=2")
    return out / "run"


# ------------------------------------------------------------------------------------------------------------
# Refused by the launcher before any party starts: exit 2, nothing created.

LAUNCHER = [  # (kind, --set overrides, what the line says)
    ("more parties than experts", ["parties=9"], "parties=9 exceeds model.num_experts=8"),
    ("unknown option", ["model.hidden=3"], "unknown option model.hidden"),
    ("unknown section", ["optim.lr=3"], "unknown config key"),
    ("wrong type", ["train.steps=ten"], "train.steps must be a int"),
    ("--set without a value", ["train.lr"], "expected section.key=value"),
    ("negative learning rate", ["train.lr=-1"], "train.lr=-1.0 must be positive"),
    ("no expert per token", ["model.top_k=0"], "model.top_k=0 must be between 1"),
    ("sequence too short", ["data.seq_len=4"], "data.seq_len=4 must be at least 8"),
    ("corpus not found", ["data.corpus=/no/such/text"], "data.corpus='/no/such/text' is neither"),
    ("a data path per party", ["data.party_paths=['/']"], "lists 1 paths for 2 parties"),
    ("unknown device", ["train.device=tpu"], "train.device='tpu'"),
    ("unknown non-finite policy", ["train.nonfinite=maybe"], "train.nonfinite='maybe': choose skip or stop"),
    ("patience of zero", ["train.nonfinite_patience=0"], "train.nonfinite_patience=0 must be at least 1"),
    ("peer timeout of zero", ["train.peer_timeout_s=0"], "train.peer_timeout_s=0.0 must be positive"),
    ("run name escaping out_dir", ["train.name=../escape"], "train.name='../escape' must be a plain folder name"),
    ("run name with a separator", ["train.name=a/b"], "train.name='a/b' must be a plain folder name"),
    ("run name '..'", ["train.name=.."], "train.name='..' must be a plain folder name"),
    ("resume and overwrite at once", ["train.resume=true", "train.overwrite=true"],
     "train.resume and train.overwrite are both true"),
]


@pytest.mark.parametrize("kind,overrides,message", LAUNCHER, ids=[k for k, _, _ in LAUNCHER])
def test_launcher_refuses_bad_config(kind, overrides, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        pcmoe(["train", *_sets([f"train.out_dir={tmp_path / 'runs'}", *overrides])])
    _one_line(capsys, ExitCode.REFUSED, info, message)
    assert not (tmp_path / "runs").exists()


def test_launcher_refuses_missing_and_broken_config_files(tmp_path, capsys):
    for path, message in ((tmp_path / "none.toml", "not found: pass an existing TOML file"),
                          (tmp_path / "bad.toml", "is not valid TOML")):
        if path.name == "bad.toml":
            path.write_text("[train\nsteps = 3\n")
        with pytest.raises(SystemExit) as info:
            pcmoe(["train", "--config", str(path)])
        _one_line(capsys, ExitCode.REFUSED, info, message)


@pytest.mark.parametrize("where", ["under a file", "a file"])
def test_launcher_refuses_an_unwritable_out_dir(where, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out_dir = blocker / "runs" if where == "under a file" else blocker
    with pytest.raises(SystemExit) as info:
        pcmoe(["train", *_sets([f"train.out_dir={out_dir}"])])
    _one_line(capsys, ExitCode.REFUSED, info, f"cannot write to '{out_dir}/tiny-2p'")
    assert blocker.read_text() == "not a folder"


def test_launcher_never_replaces_a_run_silently(finished, capsys):
    before = _snapshot(finished)
    with pytest.raises(SystemExit) as info:
        pcmoe(["train", "--parties", "1", *_sets([f"train.out_dir={finished.parent}", "train.name=run"])])
    _one_line(capsys, ExitCode.REFUSED, info, f"{finished} holds a run already: resume it (--set train.resume=true)")
    assert _snapshot(finished) == before


# ------------------------------------------------------------------------------------------------------------
# Refused by a party (as under torchrun, where no launcher checked): exit 1 (5: memory), nothing lost.


TEXT = "\n\n".join(f"Speaker {i}:\nThis is line {i} of a small play, with words enough." for i in range(300))

DATA = [  # (kind, files under the data folder, the corpus given, what the line says)
    ("binary file", {"data.bin": b"PK\x03\x04\x00\x00" + bytes(range(256)) * 40}, "data.bin",
     "is a binary file (it holds NUL bytes), not text"),
    ("not UTF-8", {"latin1.txt": TEXT.replace("small", "sm\xe4ll").encode("latin-1")}, "latin1.txt",
     "is not UTF-8 text (byte 0xe4 at offset"),
    ("corrupt gzip", {"text.txt.gz": gzip.compress(TEXT.encode())[:200]}, "text.txt.gz", "cannot read"),
    ("empty folder", {}, ".", "holds no files"),
    ("too little text", {"short.txt": b"One block, nothing to hold out."}, "short.txt",
     "has 1 text block(s) (31 characters): it needs at least 2 to hold out the last 5%; give it more text"),
    ("a binary file among text files", {"a.txt": TEXT.encode(), "b.dat": b"\x00\x01"}, ".",
     "b.dat' is a binary file"),
]


@pytest.mark.parametrize("kind,files,corpus,message", DATA, ids=[k for k, *_ in DATA])
def test_party_refuses_bad_data_naming_the_file(kind, files, corpus, message, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name, content in files.items():
        (data / name).write_bytes(content)
    with pytest.raises(SystemExit) as info:
        _train_one_party(tmp_path, f"data.corpus={data / corpus}")
    _one_line(capsys, ExitCode.BAD_INPUT, info, message)
    check_run_dir(load_config(None, [f"train.out_dir={tmp_path}", "train.name=run"]))  # a fixed rerun may start


def test_party_refuses_more_text_than_batches(tmp_path, capsys):
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT)
    with pytest.raises(SystemExit) as info:
        _train_one_party(tmp_path, f"data.corpus={corpus}", "data.seq_len=4096")
    _one_line(capsys, ExitCode.BAD_INPUT, info, "it needs 8,193 (train.batch_size x data.seq_len + 1) and 4,097 "
              "(data.seq_len + 1), about 192,147 characters in all; add text, or lower data.seq_len")


def test_party_refuses_a_party_folder_it_cannot_write(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "party0").write_bytes(b"a file where the party's folder goes")
    with pytest.raises(SystemExit) as info:
        _train_one_party(tmp_path)
    _one_line(capsys, ExitCode.BAD_INPUT, info, f"cannot write to '{tmp_path / 'run' / 'party0'}' (File exists)")
    assert (tmp_path / "run" / "party0").read_bytes() == b"a file where the party's folder goes"


def test_party_runs_out_of_memory_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:  # an embedding of 2**49 bytes: more than the address space
        _train_one_party(tmp_path, f"model.hidden_size={2**36}")
    _one_line(capsys, ExitCode.OUT_OF_MEMORY, info, "out of CPU memory at step 0: lower train.batch_size")


def test_diverged_run_stops_and_never_checkpoints_non_finite_values(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        _train_one_party(tmp_path, "train.lr=1000", "train.min_lr=0", "train.steps=30", "train.checkpoint_every=1",
                         "train.keep_checkpoints=30")
    err = _one_line(capsys, ExitCode.DIVERGED, info, "(train.nonfinite_patience=5); the run diverged")
    assert re.search(r"steps (\d+)-(\d+): non-finite values 5 steps in a row", err)
    checkpoints = sorted((tmp_path / "run" / "party0" / "checkpoints").glob("step_*.pt"))
    assert checkpoints
    for path in checkpoints:
        state = torch.load(path, weights_only=False)
        assert all(v.isfinite().all() for part in ("backbone", "experts") for v in state[part].values()), path


def test_nonfinite_stop_ends_at_the_first_such_step(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        _train_one_party(tmp_path, "train.lr=1000", "train.min_lr=0", "train.steps=30", "train.nonfinite=stop")
    _one_line(capsys, ExitCode.DIVERGED, info, "(train.nonfinite=stop); the run diverged")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "party0" / "metrics.jsonl").read_text().splitlines()]
    assert not any(r["skipped"] for r in metrics)  # stopped before any step was skipped, or checkpointed
    assert not (tmp_path / "run" / "party0" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------------------
# Checkpoints and run folders on resume.


def _copy(finished, tmp_path):
    import shutil

    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def test_resume_refuses_a_folder_of_another_configuration(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    with pytest.raises(SystemExit) as info:
        _train_one_party(tmp_path, "train.steps=8", "data.split=noniid", "train.resume=true")
    _one_line(capsys, ExitCode.BAD_INPUT, info, "holds a run of another configuration (data.split='iid', this run "
              "has 'noniid')")
    assert _snapshot(run) == before  # its metrics are not cut, its checkpoints not dropped


def test_resume_refuses_a_checkpoint_of_another_configuration(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    (run / "party0" / "config.json").unlink()  # only the checkpoint says which run it belongs to
    with pytest.raises(SystemExit) as info:
        _train_one_party(tmp_path, "train.steps=300", "train.checkpoint_every=2", "train.resume=true")
    _one_line(capsys, ExitCode.BAD_INPUT, info, "step_0000004.pt was written for another configuration "
              "(train.steps=4, this run has 300)")


def test_resume_refuses_a_file_that_is_no_checkpoint(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    torch.save([1, 2, 3], run / "party0" / "checkpoints" / "step_0000004.pt")  # a whole file, but not ours
    with pytest.raises(SystemExit) as info:
        _train_one_party(tmp_path, "train.steps=4", "train.checkpoint_every=2", "train.resume=true")
    _one_line(capsys, ExitCode.BAD_INPUT, info, "step_0000004.pt is not a pcmoe checkpoint: move it away")


@pytest.mark.parametrize("damage", ["empty", "truncated", "corrupt"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(damage, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    latest = run / "party0" / "checkpoints" / "step_0000004.pt"
    data = latest.read_bytes()
    latest.write_bytes({"empty": b"", "truncated": data[:len(data) // 2],
                        "corrupt": data[:len(data) // 2] + bytes(b ^ 0xFF for b in data[len(data) // 2:][:64])
                        + data[len(data) // 2 + 64:]}[damage])
    _train_one_party(tmp_path, "train.steps=4", "train.checkpoint_every=2", "train.resume=true")
    out = capsys.readouterr().out
    assert out.count(f"checkpoint {latest} is damaged (empty, truncated or corrupt)") == 1
    assert "resumed from" in out and "step_0000002.pt at step 2" in out
    # Steps 3 and 4 again, to the same numbers as the first time: nothing lost beyond the checkpoint skipped.
    untimed = lambda d: [{k: v for k, v in json.loads(line).items() if k not in ("step_time_s", "tokens_per_s",
                                                                                 "peak_memory_bytes")}
                         for line in (d / "party0" / "metrics.jsonl").read_text().splitlines()]
    assert untimed(run) == untimed(finished)
