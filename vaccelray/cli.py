"""The ``vaccelray`` command: parse options, build configs, call library code."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import anyio
import click

from vaccelray import __version__
from vaccelray.errors import ConnectError, RPCError, TransportError, VaccelrayError
from vaccelray.protocol import DEFAULT_MAX_MESSAGE_SIZE

log = logging.getLogger("vaccelray")

_T = TypeVar("_T")

#: Exit codes of ``vaccelray submit`` (documented in its --help).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"vaccelray: {message}", err=True)
    sys.exit(code)


def _check_endpoint(address: str) -> None:
    from vaccelray.transport.endpoints import EndpointError, parse_endpoint

    try:
        parse_endpoint(address)
    except EndpointError as exc:
        _fail(str(exc), EXIT_USAGE)


def _run(main: Callable[[], Awaitable[_T]]) -> _T:
    # asyncio: zeroconf needs it, and the transport's protocols are asyncio's.
    return anyio.run(main, backend="asyncio")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vaccelray")
def main() -> None:
    """Remote accelerators for ordinary programs.

    A worker serves the vAccel agent protocol on each accelerator host;
    clients submit work to it (or to a scheduler in front of many).
    """


WORKER_HELP = """Serve the vAccel agent protocol on this host.

Unmodified vAccel RPC clients (VACCEL_RPC_ADDRESS / VACCEL_VSOCK) can create
sessions and classify images against it. Stops gracefully on SIGINT/SIGTERM,
letting calls in flight finish.

\b
Address: -a/--address (repeatable), else VACCEL_AGENT_ENDPOINT, else
tcp://127.0.0.1:8194. Forms: tcp://HOST:PORT, unix:///PATH, unix:@NAME,
vsock://CID:PORT. Port 0 picks a free port; the ready line names it.

\b
Backend: --backend, else VACCEL_PLUGINS, else VACCEL_BACKENDS, else the
built-in default (onnx when installed with 'vaccelray[onnx]', else noop).
A value ending in .so (name or path) loads libvaccel with that plugin.
libvaccel is searched in: --libvaccel PATH, LD_LIBRARY_PATH, the plugin's
own directory, /usr/local/lib, then the system linker's search path.
"""


@main.command(help=WORKER_HELP)
@click.option(
    "-a",
    "--address",
    "addresses",
    multiple=True,
    metavar="ENDPOINT",
    help="Endpoint to listen on (repeatable).",
)
@click.option(
    "--backend", metavar="NAME", help="noop, onnx, or a vAccel plugin (.so name or path)."
)
@click.option(
    "--libvaccel",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="Path of libvaccel.so to load for a .so backend.",
)
@click.option(
    "--max-message-size",
    type=click.IntRange(1024),
    default=DEFAULT_MAX_MESSAGE_SIZE,
    show_default=True,
    help="Largest request body accepted, in bytes.",
)
@click.option(
    "--grace",
    type=click.FloatRange(0),
    default=5.0,
    show_default=True,
    help="Seconds calls in flight get to finish on shutdown.",
)
@click.option(
    "--announce/--no-announce",
    default=None,
    help="Announce the worker with zeroconf (_vaccelray._tcp). Default: announce unless "
    "every TCP listener is on loopback.",
)
@click.option(
    "--interface",
    metavar="IP",
    help="Announce only on the interface with this address (and advertise only it).",
)
@click.option(
    "--capacity",
    type=click.IntRange(1),
    help="Calls this worker runs at once, as told to schedulers.  [default: CPU count]",
)
@click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True)
def worker(
    addresses: tuple[str, ...],
    backend: str | None,
    libvaccel: str | None,
    max_message_size: int,
    grace: float,
    announce: bool | None,
    interface: str | None,
    capacity: int | None,
    log_level: str,
) -> None:
    from vaccelray.worker.daemon import DEFAULT_WORKER_ADDRESS, WorkerConfig, run_worker

    _setup_logging(log_level)
    if not addresses:
        addresses = (os.environ.get("VACCEL_AGENT_ENDPOINT") or DEFAULT_WORKER_ADDRESS,)
    for address in addresses:
        _check_endpoint(address)
    config = WorkerConfig(
        addresses=addresses,
        backend=backend,
        libvaccel=libvaccel,
        max_message_size=max_message_size,
        grace=grace,
        announce=announce,
        interface=interface,
        capacity=capacity,
    )

    async def serve_until_signalled() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with run_worker(config):
                async for signum in signals:
                    log.info("Received %s", signal.Signals(signum).name)
                    break

    try:
        _run(serve_until_signalled)
    except OSError as exc:
        _fail(f"cannot listen: {exc.strerror or exc}", EXIT_FAILED)
    except VaccelrayError as exc:
        _fail(str(exc), EXIT_FAILED)


SUBMIT_HELP = """Submit work to a worker or scheduler.

\b
Address: --address, else VACCELRAY_ADDRESS, VACCEL_RPC_ADDRESS,
VACCEL_RPC_ADDR, VACCEL_VSOCK; with none set, an embedded worker is
started in this process.

\b
Exit codes: 0 all done; 1 some work failed; 2 bad input;
3 the address could not be reached.
"""


@main.group(help=SUBMIT_HELP)
def submit() -> None:
    pass


@submit.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-a", "--address", metavar="ENDPOINT", help="Worker or scheduler to use.")
@click.option(
    "--timeout",
    type=click.FloatRange(0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds allowed for each call.",
)
@click.option("--log-level", type=LOG_LEVELS, default="warning", show_default=True)
def classify(images: tuple[Path, ...], address: str | None, timeout: float, log_level: str) -> None:
    """Classify IMAGES; prints one line per image: PATH: TAGS."""
    from vaccelray.addressing import resolve_address
    from vaccelray.classify import classify_images

    _setup_logging(log_level)
    payloads: list[tuple[Path, bytes]] = []
    for path in images:
        try:
            payloads.append((path, path.read_bytes()))
        except OSError as exc:
            _fail(f"cannot read image {path}: {exc.strerror or exc}", EXIT_USAGE)
    target = resolve_address(address)
    if target is not None:
        _check_endpoint(target)
    try:
        results = _run(
            lambda: classify_images([data for _, data in payloads], target, timeout=timeout)
        )
    except ConnectError as exc:
        _fail(
            f"{exc} (is a worker running there? start one with: vaccelray worker)", EXIT_UNREACHABLE
        )
    except (RPCError, TransportError, VaccelrayError) as exc:
        _fail(str(exc), EXIT_FAILED)
    failed = False
    for (path, _), result in zip(payloads, results, strict=True):
        if isinstance(result, RPCError):
            failed = True
            click.echo(f"vaccelray: {path}: {result}", err=True)
        else:
            click.echo(f"{path}: {result}")
    sys.exit(EXIT_FAILED if failed else EXIT_OK)
