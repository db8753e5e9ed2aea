"""A vLLM KV connector (producer) that streams each layer's KV into homelab-disagg's wire.

Loaded by vLLM itself, without patches:

    KVTransferConfig(kv_connector="WireKVConnector", kv_connector_module_path="prefill_gpu.vllm_connector",
                     kv_role="kv_producer", kv_connector_extra_config=WireSettings(...).to_extra())

A request opts in with `SamplingParams(extra_args={"kv_transfer_params": ShipTarget(...).to_params()})`,
as in vLLM's own disaggregated prefill (prompt = the ids whose KV the decode side wants, max_tokens=1).

    scheduler side   build_connector_meta: which of our requests compute in this step, and which
                     finish their prompt in it (those ship, with their whole block table)
    worker side      save_kv_layer(i): gather the request's tokens from vLLM's paged layer
                     (vllm_layout) -> llama.cpp order (keys NEOX->NORM for llama) -> codec ->
                     KvShipment (kv_shipment, as the torch worker) -> KvSender thread
                     wait_for_save: finish (or abort) the shipment, report PrefillDone/Failed to the engine

The KV is copied out of vLLM's blocks while the layer is saved, so vLLM may free or reuse them as
soon as the step ends (request_finished never delays the free). A prompt prefilled in chunks ships
at its last chunk, when every token's KV sits in the paged cache.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import zmq
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.model_executor.models.utils import extract_layer_index

from prefill_gpu.kv_encode import encode_kv, to_host
from prefill_gpu.kv_layout import neox_to_norm
from prefill_gpu.kv_shipment import KvSendError, KvShipment
from prefill_gpu.vllm_layout import LayoutError, PagedLayout, detect_layout
from wire import messages, transport

log = logging.getLogger("prefill.vllm")

PARAMS_TAG = "homelab_disagg"  # marks kv_transfer_params this connector serves


@dataclass(frozen=True)
class WireSettings:
    """What every frame of this model carries, and where shipment reports go (kv_connector_extra_config)."""

    fingerprint: bytes
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope_layout: str  # "norm": llama.cpp keeps llama keys interleaved, vLLM in rotate-half order
    report_addr: str

    def __post_init__(self) -> None:
        if self.rope_layout not in ("norm", "neox"):
            raise ValueError(f"rope_layout {self.rope_layout!r} is not one of norm, neox")

    @property
    def row_elems(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_extra(self) -> dict:
        return {"fingerprint": self.fingerprint.hex(), "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "rope_layout": self.rope_layout, "report_addr": self.report_addr}

    @classmethod
    def from_extra(cls, extra: dict) -> "WireSettings":
        try:
            return cls(bytes.fromhex(extra["fingerprint"]), int(extra["num_layers"]), int(extra["num_kv_heads"]),
                       int(extra["head_dim"]), extra["rope_layout"], extra["report_addr"])
        except KeyError as e:
            raise ValueError(f"WireKVConnector needs kv_connector_extra_config[{e.args[0]!r}] "
                             "(prefill_gpu.vllm_engine sets it)") from None


@dataclass(frozen=True)
class ShipTarget:
    """Where one request's KV goes: the decode worker's KV address, under our request id."""

    request_id: bytes  # 16 bytes
    kv_addr: str
    codec: str = "f16"
    layer_streaming: bool = True

    def to_params(self) -> dict:
        return {PARAMS_TAG: 1, "do_remote_decode": True, "request_id": self.request_id.hex(),
                "kv_addr": self.kv_addr, "codec": self.codec, "layer_streaming": self.layer_streaming}

    @classmethod
    def from_params(cls, params: dict | None) -> "ShipTarget | None":
        if not params or not params.get(PARAMS_TAG):
            return None  # not ours: an ordinary request (the colocated baseline), nothing to ship
        return cls(bytes.fromhex(params["request_id"]), params["kv_addr"], params.get("codec", "f16"),
                   bool(params.get("layer_streaming", True)))


@dataclass(frozen=True)
class ShipOrder:
    """Ship every layer of this request in the current step: its prompt completes in it."""

    req_id: str  # vLLM's request id
    target: ShipTarget
    block_ids: tuple[int, ...]  # the request's block table, in token order
    num_tokens: int  # prompt tokens = cells the decode side expects


@dataclass
class WireConnectorMetadata(KVConnectorMetadata):
    active: tuple[str, ...] = ()  # our requests computed in this step (its time counts as their compute)
    ship: tuple[ShipOrder, ...] = ()


@dataclass
class _Pending:
    target: ShipTarget
    num_tokens: int


class ShipPlanner:
    """Scheduler-side bookkeeping, plain Python: which of our requests compute in a step, and which
    complete their prompt in it and so ship (with their whole block table) from that step's forward."""

    def __init__(self, settings: WireSettings):
        self.settings = settings
        self.pending: dict[str, _Pending] = {}
        self.shipped: set[str] = set()

    def admit(self, req_id: str, params: dict | None, num_prompt_tokens: int) -> None:
        target = ShipTarget.from_params(params)
        if target is not None and req_id not in self.pending and req_id not in self.shipped:
            self.pending[req_id] = _Pending(target, num_prompt_tokens)

    def plan(self, num_computed: dict[str, int], num_scheduled: dict[str, int], block_ids_of) -> WireConnectorMetadata:
        """num_computed: tokens each scheduled request had before this step; block_ids_of(req_id)."""
        active, ship = [], []
        for req_id, num_before in num_computed.items():
            pending = self.pending.get(req_id)
            if pending is None:
                continue
            active.append(req_id)
            if num_before + num_scheduled[req_id] >= pending.num_tokens:
                ship.append(ShipOrder(req_id, pending.target, tuple(block_ids_of(req_id)), pending.num_tokens))
                del self.pending[req_id]
                self.shipped.add(req_id)
        return WireConnectorMetadata(tuple(active), tuple(ship))

    def finish(self, req_id: str, params: dict | None, num_prompt_tokens: int) -> dict | None:
        """The kv_transfer_params vLLM returns with the finished request (None: not ours)."""
        pending = self.pending.pop(req_id, None)
        shipped = req_id in self.shipped
        self.shipped.discard(req_id)
        target = pending.target if pending else ShipTarget.from_params(params)
        if target is None:
            return None
        return {"request_id": target.request_id.hex(), "kv_addr": target.kv_addr, "codec": target.codec,
                "num_tokens": num_prompt_tokens, "num_layers": self.settings.num_layers,
                "fingerprint": self.settings.fingerprint.hex(), "shipped": shipped}


@dataclass
class _Shipment:
    """One request's KV on its way out, and the first error on this side of the socket, if any."""

    order: ShipOrder
    kv: KvShipment
    error: str | None = None  # once set, the request's later layers are not even gathered


class WireKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        if not self._kv_transfer_config.is_kv_producer:
            raise ValueError("WireKVConnector only produces KV (kv_role kv_producer): decode runs in llama.cpp")
        self.settings = WireSettings.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        self.block_size = vllm_config.cache_config.block_size
        self.planner = ShipPlanner(self.settings)  # scheduler side
        # worker side
        self.layout: PagedLayout | None = None
        self._layer_index: dict[str, int] = {}
        self._shipments: dict[str, _Shipment] = {}
        self._compute_s: dict[str, float] = {}
        self._t_step = 0.0
        self._zctx: zmq.Context | None = None
        self._sender: transport.KvSender | None = None
        self._report: zmq.Socket | None = None

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return True  # save_kv_layer must run between layers, not be skipped inside a captured graph

    # ==== scheduler side ======================================================================

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False  # a producer loads nothing

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self.planner.admit(request.request_id, request.kv_transfer_params, request.num_prompt_tokens)

    def build_connector_meta(self, scheduler_output) -> WireConnectorMetadata:
        cached = scheduler_output.scheduled_cached_reqs
        num_computed = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
        num_computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        return self.planner.plan(num_computed, scheduler_output.num_scheduled_tokens,
                                 lambda req_id: self._kv_cache_manager.get_block_ids(req_id)[0])

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict | None]:
        """The blocks may go at once (the KV was copied out while each layer was saved). The params
        name what the decode side was sent, for the coordinator."""
        return False, self.planner.finish(request.request_id, request.kv_transfer_params, request.num_prompt_tokens)

    # ==== worker side =========================================================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Find the layout once, at startup: an unknown one stops vLLM here, with its name."""
        s = self.settings
        layers = self._vllm_config.compilation_config.static_forward_context
        layouts = set()
        for name, kv in kv_caches.items():
            attn = layers[name]
            layouts.add(detect_layout(attn.attn_backend.get_name(), getattr(attn, "isa", "") or "", kv,
                                      s.num_kv_heads, s.head_dim, self.block_size))
            self._layer_index[name] = extract_layer_index(name)
        if sorted(self._layer_index.values()) != list(range(s.num_layers)):
            raise LayoutError(f"vLLM's attention layers {sorted(self._layer_index.values())} are not the model's "
                              f"{s.num_layers} layers 0..{s.num_layers - 1}")
        if len(layouts) != 1:
            raise LayoutError(f"vLLM's layers use different KV layouts: {sorted(l.describe for l in layouts)}")
        self.layout = layouts.pop()
        self._zctx = zmq.Context()
        self._sender = transport.KvSender(self._zctx)
        self._report = self._zctx.socket(zmq.PUSH)
        self._report.setsockopt(zmq.LINGER, 1000)
        self._report.connect(s.report_addr)
        log.info("WireKVConnector: KV layout %s, %d layers x %d KV heads x %d", self.layout.describe, s.num_layers,
                 s.num_kv_heads, s.head_dim)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._t_step = time.perf_counter()  # bound right before the forward pass
        for order in getattr(connector_metadata, "ship", ()):
            s, target = self.settings, order.target
            kv = KvShipment(self._sender, request_id=target.request_id, kv_addr=target.kv_addr, codec=target.codec,
                            num_tokens=order.num_tokens, is_streaming=target.layer_streaming,
                            fingerprint=s.fingerprint, num_layers=s.num_layers, row_elems=s.row_elems)
            self._shipments[order.req_id] = _Shipment(order, kv)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        return  # a producer loads nothing

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not meta.ship or layer_name not in self._layer_index:
            return
        for order in meta.ship:
            ship = self._shipments[order.req_id]
            if ship.error is None:
                try:
                    self._ship_layer(ship, self._layer_index[layer_name], kv_layer)
                except Exception as e:  # fail this request, never the forward pass
                    log.exception("shipping layer %s of request %s failed", layer_name, order.target.request_id.hex())
                    ship.error = f"layer {layer_name}: {type(e).__name__}: {e}"

    def _ship_layer(self, ship: _Shipment, layer: int, kv_layer: torch.Tensor) -> None:
        s, order = self.settings, ship.order
        t0 = time.perf_counter()
        k, v = self.layout.gather(kv_layer, order.block_ids, order.num_tokens)  # each [T, H_kv, D]
        if s.rope_layout == "norm":
            k = neox_to_norm(k)
        k_pay, v_pay = encode_kv(order.target.codec, k.reshape(order.num_tokens, s.row_elems),
                                 v.reshape(order.num_tokens, s.row_elems), s.head_dim)
        k_host, _ = to_host(k_pay)
        v_host, v_ready = to_host(v_pay)  # V's copy is queued after K's on one stream: its event covers both
        ship.kv.add_layer(layer, k_host.numpy().data, v_host.numpy().data, copied=v_ready, encode_start_s=t0)

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        step_s = time.perf_counter() - self._t_step
        for req_id in meta.active:
            self._compute_s[req_id] = self._compute_s.get(req_id, 0.0) + step_s
        for order in meta.ship:
            self._finish(self._shipments.pop(order.req_id), self._compute_s.pop(order.req_id, step_s))

    def _finish(self, ship: _Shipment, compute_s: float) -> None:
        """Hand the last layers to the socket, then tell the engine how it went."""
        s, target, kv = self.settings, ship.order.target, ship.kv
        if ship.error is None and not kv.is_complete:
            ship.error = f"vLLM saved {kv.num_layers_added} of {s.num_layers} layers"
        if ship.error is not None:
            kv.abort(ship.error)
            self._send_report(messages.Failed(target.request_id, f"vLLM KV connector: {ship.error}", "prefill_error"))
            return
        try:
            figures = kv.finish()  # total_ms 0: the engine knows when the request arrived, and fills it in
        except KvSendError as e:
            self._send_report(messages.Failed(target.request_id, str(e), "kv_send"))
            return
        self._send_report(messages.PrefillDone(
            target.request_id, ship.order.num_tokens,
            compute_ms=compute_s * 1e3 - figures.encode_ms,
            device=self.layout.describe,
            **asdict(figures),
        ))

    def _send_report(self, msg) -> None:
        self._report.send(messages.encode(msg))

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        for req_id in finished_req_ids:  # aborted before their prompt completed
            self._compute_s.pop(req_id, None)
        return None, None

    def shutdown(self) -> None:
        if self._sender is not None:
            self._sender.close()
        if self._zctx is not None:
            self._zctx.destroy(linger=1000)
            self._zctx = None
