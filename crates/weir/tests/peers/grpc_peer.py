"""Real protocol peers for the gateway's tests, built on grpcio and the standard library.

  grpc_peer.py grpc-server [--tls CERT KEY]      serves weir.test.Echo; prints its port
  grpc_peer.py grpc-client TARGET [--ca CA --name SNI]
                                                 calls Say, Count and Fail; prints JSON
  grpc_peer.py https-server CERT KEY [--client-ca CA]
                                                 HTTPS echo of the request; prints its port
"""

import json
import ssl
import sys
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc


def grpc_server(args):
    def say(request, context):
        seen = dict(context.invocation_metadata())
        context.set_trailing_metadata((("x-trailer", "t1"), ("x-seen-authority", seen.get(":authority", ""))))
        return b"hello " + request

    def count(request, context):
        for i in range(int(request.decode())):
            yield f"item {i}".encode()

    def fail(request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    handlers = grpc.method_handlers_generic_handler(
        "weir.test.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handlers,))
    if args[:1] == ["--tls"]:
        cert, key = open(args[1], "rb").read(), open(args[2], "rb").read()
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def grpc_client(args):
    target = args[0]
    if "--ca" in args:
        ca = open(args[args.index("--ca") + 1], "rb").read()
        name = args[args.index("--name") + 1]
        channel = grpc.secure_channel(
            target, grpc.ssl_channel_credentials(ca), options=[("grpc.ssl_target_name_override", name)]
        )
    else:
        channel = grpc.insecure_channel(target)
    out = {}
    reply, call = channel.unary_unary("/weir.test.Echo/Say").with_call(b"weir", timeout=5)
    out["say"] = reply.decode()
    out["trailers"] = dict(call.trailing_metadata())
    out["count"] = [m.decode() for m in channel.unary_stream("/weir.test.Echo/Count")(b"5", timeout=5)]
    try:
        channel.unary_unary("/weir.test.Echo/Fail")(b"", timeout=5)
        out["fail"] = "no error"
    except grpc.RpcError as e:
        out["fail"] = [e.code().name, e.details()]
    print(json.dumps(out), flush=True)


def https_server(args):
    cert, key = args[0], args[1]

    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            peer = self.connection.getpeercert()
            body = json.dumps(
                {
                    "server": "https",
                    "path": self.path,
                    "host": self.headers.get("host"),
                    "client_cert": bool(peer),
                }
            ).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if "--client-ca" in args:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(args[args.index("--client-ca") + 1])
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    {"grpc-server": grpc_server, "grpc-client": grpc_client, "https-server": https_server}[sys.argv[1]](sys.argv[2:])
