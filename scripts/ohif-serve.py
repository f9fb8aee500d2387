#!/usr/bin/env python3
# Serves the OHIF viewer's prebuilt dist/ and proxies /dicom-web/ to Orthanc's DICOMweb plugin, so the
# browser sees one origin (no CORS set-up in Orthanc) and never needs Orthanc's credentials.
# Standard library only. Usage:
#   python3 scripts/ohif-serve.py --dist .cache/ohif/3.13.2/dist --orthanc http://127.0.0.1:8042 \
#       [--user desam:secret] [--port 3000]
# Then open http://127.0.0.1:3000/segmentation?StudyInstanceUIDs=<uid> (or /viewer?...).
import argparse
import base64
import http.server
import os
import socketserver
import sys
import urllib.error
import urllib.request

# OHIF's configuration: one DICOMweb data source at this server's /dicom-web (same origin).
APP_CONFIG = r"""
window.config = {
  routerBasename: '/',
  showStudyList: true,
  extensions: [],
  modes: [],
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc DICOMweb',
      name: 'orthanc',
      wadoUriRoot: window.location.origin + '/dicom-web',
      qidoRoot: window.location.origin + '/dicom-web',
      wadoRoot: window.location.origin + '/dicom-web',
      qidoSupportsIncludeField: false,
      supportsReject: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      staticWado: false,
      singlepart: 'bulkdata,video',
      bulkDataURI: { enabled: true },
      omitQuotationForMultipartRequest: true,
    },
  }],
};
"""

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authorization", "proxy-authenticate", "host", "content-length"}


def make_handler(dist, orthanc, auth):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=dist, **kw)

        def log_message(self, fmt, *args):
            if os.environ.get("OHIF_SERVE_LOG"):
                sys.stderr.write("ohif-serve: " + (fmt % args) + "\n")

        def do_GET(self):
            if self.path.startswith("/dicom-web/"):
                return self.proxy()
            path = self.path.split("?", 1)[0]
            if path == "/app-config.js":
                body = APP_CONFIG.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/javascript")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            # OHIF is a single-page app: its routes (/viewer, /segmentation, ...) all serve index.html.
            if not os.path.exists(os.path.join(dist, path.lstrip("/"))):
                self.path = "/index.html"
            return super().do_GET()

        def do_POST(self):
            if self.path.startswith("/dicom-web/"):
                return self.proxy()
            self.send_error(405)

        def proxy(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            req = urllib.request.Request(orthanc + self.path, data=body, method=self.command)
            for k, v in self.headers.items():
                if k.lower() not in HOP_BY_HOP and k.lower() != "authorization":
                    req.add_header(k, v)
            if auth:
                req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
            try:
                resp = urllib.request.urlopen(req, timeout=120)
                status, headers, data = resp.status, resp.headers, resp.read()
            except urllib.error.HTTPError as e:
                status, headers, data = e.code, e.headers, e.read()
            except OSError as e:
                self.send_error(502, "Orthanc unreachable: %s" % e)
                return
            self.send_response(status)
            for k, v in headers.items():
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(dist, orthanc, auth=None, host="127.0.0.1", port=0):
    """Starts the server (port 0: any free port) and returns it; call serve_forever() on it."""
    if not os.path.isfile(os.path.join(dist, "index.html")):
        raise SystemExit("ohif-serve: %s has no index.html (run scripts/setup-ohif.sh)" % dist)
    return Server((host, port), make_handler(os.path.abspath(dist), orthanc.rstrip("/"), auth))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dist", required=True)
    ap.add_argument("--orthanc", default="http://127.0.0.1:8042")
    ap.add_argument("--user", help="Orthanc user:password, added to every proxied request")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=3000)
    a = ap.parse_args()
    srv = serve(a.dist, a.orthanc, a.user, a.host, a.port)
    print("ohif-serve: OHIF on http://%s:%d/ (DICOMweb: %s/dicom-web/)" % (a.host, srv.server_address[1], a.orthanc),
          flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
