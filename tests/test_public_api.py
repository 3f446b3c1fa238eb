"""The names users and other modules import stay where they were when a module is split:
miss_ext.ops (split into fake_kernels, forward_autograd, autocast) and miss_ext.demo.run
(split into one module per step of the demo)."""

import importlib

import pytest

OPS_NAMES = [
    "dropout_seed", "shard_fold", "shard_tile_add", "shard_linear", "shard_delta_add", "bat_weight",
    "bat_block_grad", "bat_weight_grad", "bat_linear", "merge_", "unmerge_", "autocast_dtype", "autocast_cast",
    "op_names", "backward_autograd", "inplace_autograd",
    # helpers other modules imported from miss_ext.ops
    "_accumulate_dtype", "_check_devices", "_rows",
]
DEMO_RUN_NAMES = [
    "MODEL_PACKAGE", "MODEL_MODULE", "INSTALL_HINT", "DATA_FILE", "VARIANTS", "TARGET_MODULES", "MISS_R",
    "MINI_R", "MINI_MINI_R", "LORA_R", "LORA_ALPHA", "MERGE_TOLERANCE", "RELOAD_TOLERANCE", "MissingDependency",
    "find_model_dir", "check_dependencies", "load_dataset", "subsample", "build_classifier_class", "load_encoder",
    "Result", "Batches", "synchronize", "train_step", "timed_step", "evaluate", "adapt", "set_backend",
    "measure_step_times", "fresh_base", "check_adapter", "format_table", "plot_losses", "parse_args", "main", "run",
]


@pytest.mark.parametrize("module, names", [("miss_ext.ops", OPS_NAMES), ("miss_ext.demo.run", DEMO_RUN_NAMES)])
def test_names_still_import_from_where_they_were(module, names):
    mod = importlib.import_module(module)
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{module} no longer has {missing}"


def test_ops_all_is_what_the_package_exports():
    import miss_ext
    from miss_ext import ops

    for name in ops.__all__:
        assert callable(getattr(ops, name)), name
    for name in ("shard_fold", "shard_linear", "bat_linear", "merge_", "unmerge_", "dropout_seed"):
        assert getattr(miss_ext, name) is getattr(ops, name)
