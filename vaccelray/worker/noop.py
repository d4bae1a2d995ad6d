"""The built-in ``noop`` backend: vAccel's noop plugin, without libvaccel.

It answers like the C plugin (same dummy tag and image name) and logs each
call the way the plugin does, so a cluster can be tried on any machine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from vaccelray.errors import RPCError, StatusCode
from vaccelray.logs import EventLog
from vaccelray.worker.backend import (
    Arg,
    Backend,
    Classification,
    Framework,
    Model,
    ModelRun,
    SessionHandle,
    Tensor,
)

__all__ = ["NOOP_IMGNAME", "NOOP_STATUS", "NOOP_TAG", "NoopBackend"]

NOOP_TAG = "This is a dummy classification tag!"
NOOP_IMGNAME = "This is a dummy imgname!"
#: The message of the status the noop plugin answers model loads and unloads with.
NOOP_STATUS = "Operation handled by noop plugin"

log = logging.getLogger("vaccelray.backend.noop")
#: The agent-style per-event lines, written without a LogRecord each (cheap enough to leave on).
events = EventLog("vaccelray.backend.noop")


class NoopBackend(Backend):
    """Answers every operation at once with vAccel noop's dummy results."""

    name = "noop"
    blocking = False

    @property
    def ops(self) -> frozenset[str]:
        return frozenset({"classify", "genop", "exec"})

    def describe(self) -> str:
        return "noop (built-in; answers like vAccel's noop plugin)"

    def session_create(self, session_id: int, flags: int) -> SessionHandle:
        log.debug("[noop] New session %d (flags %d)", session_id, flags)
        return session_id

    def session_release(self, handle: SessionHandle) -> None:
        log.debug("[noop] Released session %s", handle)

    def classify(self, handle: SessionHandle, image: bytes, *, top_k: int = 5) -> Classification:
        events.info(
            "[noop] Calling Image classification for session %s: len_img %d", handle, len(image)
        )
        return Classification(tag=NOOP_TAG, imgname=NOOP_IMGNAME)

    def exec(
        self,
        handle: SessionHandle,
        library: str,
        symbol: str,
        read_args: Sequence[Arg],
        write_args: Sequence[Arg],
    ) -> list[bytes]:
        events.info(
            "[noop] Calling exec for session %s: library %s symbol %s nr_read %d nr_write %d",
            handle,
            library,
            symbol,
            len(read_args),
            len(write_args),
        )
        return [arg.buf for arg in write_args]

    def model_load(self, handle: SessionHandle, framework: Framework, model: Model) -> str:
        events.info(
            "[noop] Calling %s model load for session %s: model %d",
            framework.value,
            handle,
            model.id,
        )
        if framework is Framework.TORCH and not (model.blobs or model.paths):
            # The plugin reads the model's first file: none is EINVAL.
            raise RPCError(
                StatusCode.INVALID_ARGUMENT, f"PyTorch model {model.id} has no file to load"
            )
        return NOOP_STATUS

    def model_unload(self, handle: SessionHandle, framework: Framework, model: Model) -> str:
        events.info(
            "[noop] Calling %s model unload for session %s: model %d",
            framework.value,
            handle,
            model.id,
        )
        return NOOP_STATUS

    def model_run(
        self, handle: SessionHandle, framework: Framework, model: Model, run: ModelRun
    ) -> list[Tensor]:
        """Input tensor *i* comes back as output tensor *i*, for each output asked for."""
        events.info(
            "[noop] Calling %s model run for session %s: model %d nr_in %d nr_out %d",
            framework.value,
            handle,
            model.id,
            len(run.inputs),
            run.outputs,
        )
        if run.outputs > len(run.inputs):
            raise RPCError(
                StatusCode.INVALID_ARGUMENT,
                f"{framework.value} model run asks for {run.outputs} outputs but has "
                f"{len(run.inputs)} inputs to echo",
            )
        return list(run.inputs[: run.outputs])
