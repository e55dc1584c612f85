"""The commands that use or serve a tuned model: `generate` (proxy-tuned answers), `serve` (a run as an
OpenAI-compatible API) and `serve-logits` (a large model's log-probabilities for a federation that may only query
it). Heavy imports stay inside the handlers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedpt_app.config import QUANTIZATIONS, ConfigError


def add_serving_commands(commands) -> None:
    _add_generate_command(commands)
    _add_serve_logits_command(commands)
    _add_serve_command(commands)


def generate(args: argparse.Namespace) -> int:
    """Answer instructions with the proxy-tuned large model: large + alpha * (small with adapter - small)."""
    from peft import PeftModel

    from fedpt_app.instruct.decoding import DEFAULT_STOP_STRINGS, DecodingConfig
    from fedpt_app.instruct.proxy import proxy_generate
    from fedpt_app.models.loading import load_causal_lm, load_tokenizer
    from fedpt_app.serving.providers import load_logits_provider

    small_ref, large_ref, adapter_dir = _generation_models(args)
    large = load_logits_provider(small_ref, large_ref, args.quantization)  # a URL: FEDPT_LOGITS_TOKEN
    small = PeftModel.from_pretrained(load_causal_lm(small_ref), adapter_dir)
    config = DecodingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        stop_strings=tuple(args.stop) if args.stop is not None else DEFAULT_STOP_STRINGS,
        seed=args.seed,
    )
    inputs = (large, small, load_tokenizer(small_ref), args.prompts)
    options = {"alpha": args.alpha, "config": config, "contexts": [args.context] * len(args.prompts)}
    if args.draft_tokens:
        from fedpt_app.instruct.speculative import bfloat16_drafter, speculative_generate

        drafter = bfloat16_drafter(small) if args.draft_dtype == "bfloat16" else None
        answers, _ = speculative_generate(*inputs, draft_tokens=args.draft_tokens, drafter=drafter, **options)
    else:
        answers = proxy_generate(*inputs, **options)
    for prompt, answer in zip(args.prompts, answers, strict=True):
        print(json.dumps({"instruction": prompt, "response": answer}, ensure_ascii=False) if args.json else answer)
    return 0


def _run_summary(run: str) -> dict:
    """A finished run's summary.json (`--run DIR`)."""
    summary_path = Path(run) / "summary.json"
    if not summary_path.is_file():
        raise ConfigError(f"--run {run!r}: no summary.json there (is it a finished run's output-dir?)")
    return json.loads(summary_path.read_text())


def _generation_models(args: argparse.Namespace, proxy: bool = True) -> tuple[str, str, str]:
    """(small, large, adapter folder) from the flags, or from a finished run's summary.json (`--run DIR`): for the
    proxy, the adapter its scores were measured with (FedPT's `proxy-adapter/`), else the run's final one."""
    small, large, adapter = args.small, args.large, args.adapter
    if args.run:
        summary = _run_summary(args.run)
        if summary.get("adapter_base_model", summary.get("small_model")) != summary.get("small_model"):
            raise ConfigError(
                f"--run {args.run!r} tuned the large model ({summary['algorithm']}): its adapter "
                "is not a small-model adapter for proxy-tuning"
            )
        small, large, adapter = (
            small or summary["small_model"],
            large or summary["large_model"],
            adapter or (proxy and summary.get("proxy_adapter_dir")) or summary["adapter_dir"],
        )
    missing = [flag for flag, value in (("--small", small), ("--large", large), ("--adapter", adapter)) if not value]
    if missing:
        raise ConfigError(f"generate needs {', '.join(missing)} (or --run with a finished run's output-dir)")
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {adapter!r} is not a saved peft adapter folder (no adapter_config.json)")
    return small, large, adapter


def _add_generate_command(commands) -> None:
    command = commands.add_parser("generate", help="answer instructions with a proxy-tuned large model")
    command.add_argument("prompts", nargs="+", help="instructions (wrapped in the app's prompt template)")
    command.add_argument("--run", default="", help="a finished run's output-dir: takes its models and adapter")
    command.add_argument("--small", default="", help="small model reference (the adapter's base)")
    command.add_argument(
        "--large", default="", help="large model reference, or a serve-logits URL (used through its logits only)"
    )
    command.add_argument("--adapter", default="", help="the small model's LoRA adapter folder (save_pretrained)")
    command.add_argument("--alpha", type=float, default=1.0, help="proxy strength")
    command.add_argument(
        "--quantization", choices=QUANTIZATIONS, default="none", help="bf16 weights, or bitsandbytes 8/4-bit"
    )
    command.add_argument("--context", default="", help="optional input shown with every instruction")
    command.add_argument("--max-new-tokens", type=int, default=64)
    command.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    command.add_argument("--top-p", type=float, default=1.0)
    command.add_argument("--stop", action="append", default=None, help="stop string (repeatable; default ###)")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument(
        "--draft-tokens",
        type=int,
        default=0,
        help="speculative proxy decoding: the tuned small drafts this many tokens per large forward (0: off; same "
        "greedy output, the proxy's distribution when sampling)",
    )
    command.add_argument(
        "--draft-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="with --draft-tokens: draft with the tuned small itself, or with a merged bfloat16 copy of it (faster "
        "where bfloat16 is: recent CPUs, GPUs; the answers stay the same)",
    )
    command.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    command.set_defaults(handler=generate)


def serve_logits(args: argparse.Namespace) -> int:
    """The large model's owner serves its log-probabilities (never its weights) to the federation's server."""
    from fedpt_app.serving.logits_service import ServiceLimits, serve

    given = {
        "max_batch": args.max_batch,
        "max_positions": args.max_positions,
        "max_sessions": args.max_sessions,
        "session_ttl_s": args.session_ttl,
    }
    limits = ServiceLimits(**{key: value for key, value in given.items() if value is not None})
    serve(
        args.model,
        host=args.host,
        port=args.port,
        token_file=args.token_file,
        quantization=args.quantization,
        limits=limits,
        tls_certfile=args.tls_certfile,
        tls_keyfile=args.tls_keyfile,
        allow_plain_http=args.allow_plain_http,
    )
    return 0


def _add_serve_logits_command(commands) -> None:
    command = commands.add_parser(
        "serve-logits", help="serve a large model's next-token log-probabilities (protocol fedpt-logits/1)"
    )
    command.add_argument("--model", required=True, help="any model reference the loader takes")
    command.add_argument("--host", default="127.0.0.1")
    command.add_argument("--port", type=int, default=8765)
    command.add_argument("--token-file", required=True, help="file holding the bearer token clients must send")
    command.add_argument(
        "--quantization", choices=QUANTIZATIONS, default="none", help="bfloat16, or bitsandbytes 8/4-bit"
    )
    command.add_argument("--tls-certfile", default="", help="serve HTTPS with this certificate (PEM)")
    command.add_argument("--tls-keyfile", default="", help="and this private key (PEM)")
    command.add_argument("--allow-plain-http", action="store_true", help="plain HTTP off loopback (behind a TLS proxy)")
    limits = "(default: ServiceLimits' in fedpt_app/serving/logits_service.py)"
    command.add_argument("--max-batch", type=int, help=f"sequences per request {limits}")
    command.add_argument("--max-positions", type=int, help=f"positions per sequence {limits}")
    command.add_argument("--max-sessions", type=int, help=f"open decoding sessions {limits}")
    command.add_argument("--session-ttl", type=float, help=f"seconds before an idle session is dropped {limits}")
    command.set_defaults(handler=serve_logits)


def serve(args: argparse.Namespace) -> int:
    """The tuned result as an OpenAI-compatible API (fedpt_app/serving/openai_api.py), models loaded once."""
    import uvicorn

    from fedpt_app.serving.openai_api import create_app, load_served_model
    from fedpt_app.serving.openai_schema import ServerSettings

    small, large, adapter = _serve_models(args)
    settings = ServerSettings(
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_tokens_limit=args.max_tokens_limit,
        api_key=_api_key(args.api_key_file),
        max_logprobs=args.max_logprobs,
    )
    model = load_served_model(
        args.model, small, large, adapter, alpha=args.alpha, quantization=args.quantization, name=args.served_name
    )
    print(
        f"[fedpt-app] serving {model.name!r} ({args.model}) at http://{args.host}:{args.port}/v1"
        + (" (API key required)" if settings.api_key else ""),
        flush=True,
    )
    uvicorn.run(create_app(model, settings), host=args.host, port=args.port, log_level="info")
    return 0


def _serve_models(args: argparse.Namespace) -> tuple[str, str, str]:
    """(small, large, adapter) as `generate` takes them; `--model large` needs only the large."""
    if args.model != "large":
        return _generation_models(args, proxy=args.model == "proxy")
    large = args.large
    if not large and args.run:
        large = _run_summary(args.run)["large_model"]
    if not large:
        raise ConfigError("serve --model large needs --large (or --run with a finished run's output-dir)")
    return "", large, ""


def _api_key(path: str) -> str | None:
    if not path:
        return None
    key = Path(path).read_text().strip()
    if not key:
        raise ConfigError(f"--api-key-file {path!r} is empty")
    return key


def _add_serve_command(commands) -> None:
    command = commands.add_parser("serve", help="serve a tuned run as an OpenAI-compatible API (/v1/completions, ...)")
    command.add_argument("--run", default="", help="a finished run's output-dir: takes its models and adapter")
    command.add_argument(
        "--model",
        choices=("proxy", "small", "large"),
        default="proxy",
        help="proxy: the proxy-tuned large; small: the tuned small; large: the untuned large alone",
    )
    command.add_argument("--small", default="", help="small model reference (the adapter's base)")
    command.add_argument("--large", default="", help="large model reference (proxy: also a serve-logits URL)")
    command.add_argument("--adapter", default="", help="the small model's LoRA adapter folder (save_pretrained)")
    command.add_argument("--served-name", default="", help="the model id clients send (default: fedpt-MODEL)")
    command.add_argument("--host", default="127.0.0.1")
    command.add_argument("--port", type=int, default=8000)
    command.add_argument("--alpha", type=float, default=1.0, help="proxy strength")
    command.add_argument(
        "--quantization", choices=QUANTIZATIONS, default="none", help="bf16 weights, or bitsandbytes 8/4-bit"
    )
    command.add_argument("--max-batch", type=int, default=8, help="requests decoded together in one batch")
    command.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for company")
    command.add_argument("--max-tokens-limit", type=int, default=512, help="the most new tokens a request may ask")
    command.add_argument(
        "--max-logprobs", type=int, default=20, help="the most logprobs/top_logprobs a request may ask (as vLLM's)"
    )
    command.add_argument("--api-key-file", default="", help="file holding the key clients send as Bearer token")
    command.set_defaults(handler=serve)
