"""TLS-terminating reverse proxy for the https tests: https://127.0.0.1:<port> -> http://127.0.0.1:<upstream>.

Usage: tls_proxy.py CERT.pem KEY.pem UPSTREAM_PORT. Prints the port it listens on, then serves until
killed, or for at most 10 minutes (so a crashed test never leaves it behind). Standard library only.
"""
import http.client
import http.server
import os
import ssl
import sys
import threading

CERT, KEY, UPSTREAM = sys.argv[1], sys.argv[2], int(sys.argv[3])
# Hop-by-hop headers are the proxy's own business; the body is re-sent with a Content-Length.
HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def forward(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        upstream = http.client.HTTPConnection("127.0.0.1", UPSTREAM, timeout=120)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
        finally:
            upstream.close()
        self.send_response(answer.status)
        for k, v in answer.getheaders():
            if k.lower() not in HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = forward

    def log_message(self, *args):
        pass


def main():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(CERT, KEY)
    # A client that refuses the certificate fails the handshake inside accept(); socketserver
    # catches that OSError and goes on serving.
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Timer(600, lambda: os._exit(0)).start()
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
