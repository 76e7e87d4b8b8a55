"""A stand-in for an Ollama server, following the API documented in ollama/docs/api.md.

No Ollama binary can be installed on the machines the tests run on, so this server plays
one for infermem's runtime control: `GET /api/ps` lists the loaded models; `POST
/api/generate` with a model and `"keep_alive": 0` unloads it, and without a prompt loads it.
It listens where `OLLAMA_HOST` says (127.0.0.1:PORT), starts with the models named on its
command line loaded (the last one expiring last), and prints one JSON line per request.
"""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

LOADED = {}


def entry(name, rank):
    return {
        "name": name,
        "model": name,
        "size": 1 << 30,
        "size_vram": 0,
        "digest": "0" * 64,
        "details": {"format": "gguf", "family": "llama", "parameter_size": "1B",
                    "quantization_level": "Q4_0"},
        "expires_at": "2030-01-01T00:%02d:00Z" % rank,
    }


class Handler(BaseHTTPRequestHandler):
    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/api/ps":
            self.reply({"models": list(LOADED.values())})
        else:
            self.send_error(404)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        request = json.loads(self.rfile.read(length) or b"{}")
        print(json.dumps({"event": "request", "path": self.path, "body": request}), flush=True)
        if self.path != "/api/generate" or "model" not in request:
            self.send_error(400)
            return
        name = request["model"]
        if request.get("keep_alive") == 0:
            LOADED.pop(name, None)
            self.reply({"model": name, "done": True, "done_reason": "unload"})
        elif not request.get("prompt"):
            LOADED[name] = entry(name, len(LOADED))
            self.reply({"model": name, "done": True, "done_reason": "load"})
        else:
            self.send_error(501)

    def log_message(self, *args):
        pass


def main():
    for rank, name in enumerate(sys.argv[1:]):
        LOADED[name] = entry(name, rank)
    host, port = os.environ["OLLAMA_HOST"].rsplit(":", 1)
    server = HTTPServer((host, int(port)), Handler)
    print(json.dumps({"event": "listening", "pid": os.getpid(), "port": server.server_port}),
          flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
