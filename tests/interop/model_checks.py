"""What the Go peer's ``models`` check must see from a noop agent (worker or scheduler).

The peer plays a vAccel application using TensorFlow, TFLite and PyTorch
through the RPC plugin: one model resource, loaded, run and unloaded under
each framework, synced, profiled, and a model id nobody registered.
"""

from __future__ import annotations

from typing import Any

NOOP_STATUS = "Operation handled by noop plugin"


def assert_noop_models(results: dict[str, list[dict[str, Any]]]) -> None:
    [register] = results["model_register"]
    assert register["create_code"] == 0, register
    assert register["code"] == 0, register
    model = register["model_id"]
    assert model > 0

    [load] = results["tf_load"]
    assert load["code"] == 0, load
    assert (load["status_code"], load["status_message"]) == (0, NOOP_STATUS)
    [run] = results["tf_run"]
    assert run["code"] == 0, run
    # one output per output node: input tensor i comes back as output i
    assert run["out"] == [["abcdefghijklmnop", [2, 2], 1], ["z", [1], 4]]
    [unload] = results["tf_unload"]
    assert unload["code"] == 0, unload
    assert unload["status_message"] == NOOP_STATUS

    [lite] = results["tflite"]
    assert (lite["load_code"], lite["run_code"], lite["unload_code"]) == (0, 0, 0), lite
    assert lite["out"] == [["lite", [4], 3]]

    [torch] = results["torch"]
    assert (torch["load_code"], torch["run_code"]) == (0, 0), torch
    assert torch["out"] == [["t0", [2], 1], ["t1t1t1t1", [1, 2], 7]]

    [sync] = results["sync_resource"]
    assert sync["code"] == 0, sync
    assert sync["blobs"] == [[1, "model.bin", "weights", 7]]

    [profiler] = results["profiler"]
    assert profiler["code"] == 0, profiler
    assert profiler["component_name"] == "vaccelray-agent"

    [unknown] = results["unknown_model"]
    assert unknown["torch_code"] == 5, unknown
    assert unknown["torch_message"] == "Unknown PyTorch model 424242"
    assert unknown["tf_code"] == 5
    assert unknown["tf_message"] == "Unknown TensorFlow model 424242"
    assert unknown["sync_code"] == 5
    assert unknown["sync_message"] == "Unknown resource 424242"


#: The frameworks whose model ops each libvaccel generation has (DESIGN §5).
LIBVACCEL_FRAMEWORKS = {
    "0.5": {"tf"},
    "0.6": {"tf", "tflite"},
    "0.7": {"tf", "tflite", "torch"},
    "current": {"tf", "tflite", "torch"},
}


def _unimplemented(record: dict[str, Any], prefix: str, method: str) -> None:
    assert record[f"{prefix}code"] == 12, (method, record)
    assert record[f"{prefix}message"] == f"backend libvaccel does not support {method}"


def assert_libvaccel_models(results: dict[str, list[dict[str, Any]]], generation: str) -> None:
    """What the ``models`` check must see from a worker on one libvaccel generation's double.

    The double's plugin answers like vAccel's noop plugin, so each op the
    generation has answers as on noop; an op it lacks is UNIMPLEMENTED naming
    the op and the backend; resource sync came with the current generation.
    """
    have = LIBVACCEL_FRAMEWORKS[generation]
    [register] = results["model_register"]
    assert register["code"] == 0, register

    [load] = results["tf_load"]
    assert (load["code"], load["status_code"], load["status_message"]) == (0, 0, NOOP_STATUS)
    [run] = results["tf_run"]
    assert run["out"] == [["abcdefghijklmnop", [2, 2], 1], ["z", [1], 4]]
    [unload] = results["tf_unload"]
    assert (unload["code"], unload["status_message"]) == (0, NOOP_STATUS)

    [lite] = results["tflite"]
    if "tflite" in have:
        assert (lite["load_code"], lite["run_code"], lite["unload_code"]) == (0, 0, 0), lite
        assert lite["out"] == [["lite", [4], 3]]
    else:
        _unimplemented(lite, "load_", "TensorflowLiteModelLoad")
        _unimplemented(lite, "run_", "TensorflowLiteModelRun")
        _unimplemented(lite, "unload_", "TensorflowLiteModelUnload")

    [torch] = results["torch"]
    if "torch" in have:
        assert (torch["load_code"], torch["run_code"]) == (0, 0), torch
        assert torch["out"] == [["t0", [2], 1], ["t1t1t1t1", [1, 2], 7]]
    else:
        _unimplemented(torch, "load_", "TorchModelLoad")
        _unimplemented(torch, "run_", "TorchModelRun")

    [sync] = results["sync_resource"]
    if generation == "current":
        assert sync["code"] == 0, sync
        # the library's copy of the model's blob, as vaccel_resource_sync left it
        assert sync["blobs"] == [[1, "model.bin", "weights", 7]]
    else:
        _unimplemented(sync, "", "SyncResource")

    [unknown] = results["unknown_model"]
    assert (unknown["torch_code"], unknown["tf_code"], unknown["sync_code"]) == (5, 5, 5)
