"""Open Inference Protocol v2 over gRPC (KServe / Triton's `GRPCInferenceService`), on `grpcio`.

    ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata    as over HTTP
    ModelInfer          one request, one response: the answers once every input is released
    ModelStreamInfer    Triton's decoupled streaming: on one stream, each request's answers the
                        moment they are released (at a ramp or at the end) and, when the request
                        sets the parameter `final_answer: true`, a second response with the model's
                        own answers once the batch ends, for the inputs that exited early
    RepositoryIndex     the served model and its state (as `POST /v2/repository/index`)
    RepositoryModelLoad swap in a re-prepared bundle (parameter `bundle`: its path), as over HTTP

The servicer is `tritonclient`'s generated `GRPCInferenceServiceServicer`: the protocol's own
bindings, never a copied .proto. Requests are checked by the HTTP API's code (`grpc_tensors`), so
a bad input gets INVALID_ARGUMENT with the message HTTP's 400 carries; overload and shutdown are
UNAVAILABLE (HTTP's 503), a request that can never meet the SLO FAILED_PRECONDITION (413), a
model error INTERNAL (500). Responses carry the early-exit details as parameters, as over HTTP
(`exit_site`, `early_exit`, `confidence`, `latency_ms`, ...); streamed ones add `final` (false:
a ramp's answer that a final one follows; true: the model's own answer).

The server runs on its own thread and event loop (grpc's asyncio server needs the standard loop,
and keeps its work off the HTTP loop); answers reach it through the engine's futures.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, AsyncIterator

from . import grpc_tensors as gt
from .model_io import InputError
from .protocol import infer_response, model_metadata
from .requests import Rejected

log = logging.getLogger("apparate.serve")

EXTENSIONS = ["earlyexit", "model_repository", "binary_tensor_data", "decoupled"]


def _status(code: int) -> Any:
    import grpc

    return {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
            413: grpc.StatusCode.FAILED_PRECONDITION, 503: grpc.StatusCode.UNAVAILABLE}.get(
        code, grpc.StatusCode.INTERNAL)


def grpc_status(name: str) -> Any:
    import grpc

    return getattr(grpc.StatusCode, name)


class Failed(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def make_servicer(engine: Any, repository: Any = None) -> Any:
    """A `GRPCInferenceServiceServicer` over `engine` (and its `repository.Repository`, for loads)."""
    from tritonclient.grpc import service_pb2_grpc

    m = gt.pb()
    policy = engine.control.options.policy

    def served() -> Any:
        return engine.served

    def check_model(name: str, version: str = "") -> None:
        s = served()
        if name != s.name or version not in ("", "1"):
            what = f"model {name!r}" + (f" version {version!r}" if version else "")
            raise Failed(404, f"unknown {what}; this server serves {s.name!r} (version 1)")

    def ready() -> bool:
        return bool(engine.ready and engine.running)

    async def answers(request: Any, finals: bool) -> tuple[Any, list[Any]]:
        """Admit a ModelInferRequest: (its parsed request, the engine's Requests)."""
        check_model(request.model_name, request.model_version)
        why = engine.admission.refusal()
        if why is not None:
            engine.metrics.drop(why)
            raise Failed(503, why)
        s = served()
        try:
            req = gt.parse_request(request, s.codec, s.class_names)
        except InputError as e:
            raise Failed(400, str(e)) from None
        return req, engine.admit(req.items, req.costs, finals=finals)

    def response(req: Any, results: list[Any], extra: dict[str, Any] | None = None) -> Any:
        bad = [r for r in results if isinstance(r, Rejected)]
        if bad:
            worst = max(bad, key=lambda r: r.status)
            raise Failed(worst.status, worst.reason)
        s = served()
        return gt.infer_response(infer_response(s.name, req, results, s.class_names), extra)

    async def abort(context: Any, e: Failed) -> None:
        await context.abort(_status(e.code), e.message)

    class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ServerLive(self, request: Any, context: Any) -> Any:
            return m.ServerLiveResponse(live=True)

        async def ServerReady(self, request: Any, context: Any) -> Any:
            return m.ServerReadyResponse(ready=ready())

        async def ServerMetadata(self, request: Any, context: Any) -> Any:
            from apparate import __version__

            return m.ServerMetadataResponse(name="apparate", version=__version__, extensions=EXTENSIONS)

        async def ModelReady(self, request: Any, context: Any) -> Any:
            try:
                check_model(request.name, request.version)
            except Failed as e:
                await abort(context, e)
            return m.ModelReadyResponse(ready=ready())

        async def ModelMetadata(self, request: Any, context: Any) -> Any:
            try:
                check_model(request.name, request.version)
            except Failed as e:
                await abort(context, e)
            return gt.model_metadata(model_metadata(served(), policy))

        async def ModelInfer(self, request: Any, context: Any) -> Any:
            try:
                req, reqs = await answers(request, finals=False)
                return response(req, list(await asyncio.gather(*(r.future for r in reqs))))
            except Failed as e:
                await abort(context, e)

        async def ModelStreamInfer(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            out: asyncio.Queue = asyncio.Queue()
            pending: set[asyncio.Task] = set()

            async def one(request: Any) -> None:
                params = gt.request_parameters(request)
                wants_final = bool(params.get("final_answer", False))
                flag = bool(params.get("triton_enable_empty_final_response", False))
                try:
                    req, reqs = await answers(request, finals=wants_final)
                    results = list(await asyncio.gather(*(r.future for r in reqs)))
                    early = [r for r, a in zip(reqs, results) if not isinstance(a, Rejected) and a.early]
                    follows = wants_final and bool(early)
                    first = response(req, results, {"final": not any(a.early for a in results
                                                                      if not isinstance(a, Rejected)),
                                                    **({"triton_final_response": not follows} if flag else {})})
                    await out.put(m.ModelStreamInferResponse(infer_response=first))
                    if follows:  # the model's own answers: the final ones, and the early ones' finals
                        finals = [(await r.final) if r.final is not None and a.early else a
                                  for r, a in zip(reqs, results)]
                        last = response(req, finals, {"final": True, **({"triton_final_response": True} if flag else {})})
                        await out.put(m.ModelStreamInferResponse(infer_response=last))
                except Failed as e:
                    await out.put(m.ModelStreamInferResponse(error_message=e.message))

            async def read() -> None:
                async for request in request_iterator:
                    task = asyncio.ensure_future(one(request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    task.add_done_callback(lambda _: out.put_nowait(None))  # wake the writer

            reader = asyncio.ensure_future(read())
            reader.add_done_callback(lambda _: out.put_nowait(None))
            while True:
                item = await out.get()
                if item is not None:
                    yield item
                elif reader.done() and not pending and out.empty():
                    break
            reader.result()  # a broken request stream ends the call with its error

        async def RepositoryIndex(self, request: Any, context: Any) -> Any:
            from .repository import index

            rows = index(engine, ready_only=request.ready)
            return m.RepositoryIndexResponse(models=[m.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

        async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
            if repository is None:
                await context.abort(grpc_status("PERMISSION_DENIED"), "loading bundles is off: start the server "
                                    "with --allow-load")
            from .repository import load_parameters

            params = {k: gt.parameter_value(v) for k, v in request.parameters.items()}
            try:
                bundle = load_parameters(params)
                await asyncio.to_thread(repository.load, request.model_name, bundle)
            except LookupError as e:
                await abort(context, Failed(404, str(e.args[0])))
            except (ValueError, FileNotFoundError) as e:
                await abort(context, Failed(400, str(e)))
            return m.RepositoryModelLoadResponse()

    return Servicer()


class GrpcThread:
    """The gRPC server on its own thread and event loop; port 0 binds a free one (`.port`)."""

    def __init__(self, engine: Any, host: str = "127.0.0.1", port: int = 0, repository: Any = None,
                 max_message_bytes: int = 64 << 20):
        self.engine, self.host, self.port, self.repository = engine, host, port, repository
        self.max_message_bytes = max_message_bytes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._grace = 5.0
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="apparate-grpc", daemon=True)

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self._error = e
            self._started.set()
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        await self._start()
        self._started.set()
        await self._stopping.wait()
        await self._server.stop(self._grace)

    async def _start(self) -> None:
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        opts = [("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes)]
        self._server = grpc.aio.server(options=opts)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(make_servicer(self.engine, self.repository),
                                                                   self._server)
        self.port = self._server.add_insecure_port(f"{self.host}:{self.port}")
        if not self.port:
            raise RuntimeError(f"could not bind gRPC to {self.host}")
        await self._server.start()

    def start(self, timeout: float = 30.0) -> "GrpcThread":
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError("the gRPC server did not start")
        if self._error is not None:
            raise self._error
        log.info("gRPC (OIP v2) at %s", self.url)
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking calls; those in flight get `grace` seconds to finish."""
        self._grace = grace
        if self._thread.ident is None:  # never started (the HTTP side failed first)
            return
        if self._loop is not None and self._stopping is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(grace + 10)

    def __enter__(self) -> "GrpcThread":
        return self.start() if not self._thread.is_alive() else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
