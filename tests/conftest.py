"""Suite-wide settings and the robustness summary printed at the end of every run.

The summary counts distinct bad inputs (passed test cases marked ``bad_input``; the
bad-input tests of files owned by others are marked here by name) and the fuzz examples
recorded by tests/test_robustness.py through the ``robustness_report`` fixture.
"""

import numpy as np
import pytest
import torch

# Tiny models on a shared CPU run fastest single-threaded.
torch.set_num_threads(1)

# Bad-input tests in files that do not use the marker themselves: file -> test functions.
BAD_INPUT_TESTS = {
    "test_validation.py": {
        "test_bad_image", "test_bad_image_format", "test_bad_torch_image", "test_bad_prompt",
        "test_non_numeric_prompt", "test_predict_before_set_image", "test_bad_torch_prompt",
        "test_bad_torch_mask_input", "test_bad_amg_params", "test_generate_batch_rejects_single_image",
    },
    "test_checkpoint.py": {
        "test_missing_file_names_the_path", "test_directory_is_refused", "test_truncated_checkpoint",
        "test_not_a_checkpoint_file", "test_not_a_state_dict", "test_foreign_state_dict",
        "test_pickle_with_code_is_refused", "test_other_model_size_names_likely_type",
        "test_tiny_checkpoint_into_official_model", "test_missing_and_unexpected_keys_are_listed",
        "test_shape_mismatch_same_family",
    },
    "test_cli_amg.py": {"test_bad_inputs"},
    "test_eval_combo.py": {"test_missing_image_reported_and_skipped", "test_bad_annotations_and_flags"},
}
_REPORT = pytest.StashKey[dict]()


def pytest_configure(config):
    config.addinivalue_line("markers", "bad_input: a test case feeding one distinct bad input (counted in the summary)")
    config.stash[_REPORT] = {"fuzz": {}, "bad_input_passed": {}, "bad_input_failed": 0}


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = BAD_INPUT_TESTS.get(item.path.name, ())
        if getattr(item, "originalname", item.name) in names:
            item.add_marker("bad_input")


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same torch / numpy random state, so random-init weights and
    inputs do not depend on which tests ran before (tests that need other draws seed themselves)."""
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def robustness_report(pytestconfig):
    """Dict that fuzz tests fill with per-entry-point outcome counts."""
    return pytestconfig.stash[_REPORT]["fuzz"]


def pytest_runtest_makereport(item, call):
    if call.when == "call" and item.get_closest_marker("bad_input") is not None:
        rep = item.config.stash[_REPORT]
        if call.excinfo is None:
            f = item.path.name
            rep["bad_input_passed"][f] = rep["bad_input_passed"].get(f, 0) + 1
        else:
            rep["bad_input_failed"] += 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rep = config.stash[_REPORT]
    if not rep["bad_input_passed"] and not rep["bad_input_failed"] and not rep["fuzz"]:
        return
    tr = terminalreporter
    tr.write_sep("=", "robustness summary")
    n = sum(rep["bad_input_passed"].values())
    by_file = ", ".join(f"{f}: {k}" for f, k in sorted(rep["bad_input_passed"].items()))
    if n or rep["bad_input_failed"]:
        tr.write_line(f"bad inputs rejected with the documented error and message: {n} ({by_file})"
                      + (f"; {rep['bad_input_failed']} FAILED" if rep["bad_input_failed"] else ""))
    for name, s in sorted(rep["fuzz"].items()):
        tr.write_line(f"fuzz {name}: {s['run']} cases, {s['ok']} valid outputs, "
                      f"{s['documented_error']} documented errors, {s['crash']} unexplained crashes")
