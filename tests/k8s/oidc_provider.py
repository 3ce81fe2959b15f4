"""An OpenID Connect provider for the k8s tier's hub: oidc-provider-mock on 127.0.0.1.

Run inside the cluster's network namespace, where the hub and the browser are:
``python oidc_provider.py PORT USERS`` with USERS a JSON object (sub → claims). The users are
registered through the provider's own HTTP API; then it prints ``ready`` and serves until killed.
"""

from __future__ import annotations

import json
import sys
import threading
import urllib.request
import warnings


def main() -> None:
    port, users = int(sys.argv[1]), json.loads(sys.argv[2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import oidc_provider_mock
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", port, oidc_provider_mock.app(), threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    for sub, claims in users.items():
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/users/{sub}",
            data=json.dumps(claims).encode(),
            method="PUT",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 204, response.status
    print("ready", flush=True)
    thread.join()


if __name__ == "__main__":
    main()
