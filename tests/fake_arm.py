#!/usr/bin/env python3
"""A FAKE Azure Resource Manager and token endpoint, for tests only.

Azure Resource Manager cannot run here, so the Azure adapter is tested against this stand-in.
It implements only the resources the adapter uses (subscriptions, VM sizes, virtual machines
with their instance view, power off and start, managed disks, network interfaces, and the
virtual networks, subnets and availability sets a test seeds), and enforces what the real API
enforces for them: a bearer token from its token endpoint (client credentials), the
api-version of each provider, and the required fields of each body. Long operations answer
201/202 with an Azure-AsyncOperation URL that reports Succeeded.

Every request is recorded; GET /_fake/requests returns them (method, path, query, body) and
GET /_fake/state the resources it holds. Started as `fake_arm.py STATE.json`; prints
`FAKE_ARM_PORT=N` once it listens.
"""

import json
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API_VERSIONS = {
    "subscriptions": "2022-12-01",
    "microsoft.compute/virtualmachines": "2024-07-01",
    "microsoft.compute/locations": "2024-07-01",
    "microsoft.compute/availabilitysets": "2024-07-01",
    "microsoft.compute/disks": "2024-03-02",
    "microsoft.network/networkinterfaces": "2024-05-01",
    "microsoft.network/virtualnetworks": "2024-05-01",
}

LOCK = threading.Lock()
STATE = {}
REQUESTS = []
TOKENS = set()


def provider_of(path):
    parts = [p.lower() for p in path.strip("/").split("/")]
    if "providers" in parts:
        i = parts.index("providers")
        return "/".join(parts[i + 1:i + 3])
    return "subscriptions"


def error(code, message):
    return {"error": {"code": code, "message": message}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body=None, headers=()):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def handle_any(self, method):
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        raw = self.body()
        path = urllib.parse.unquote(url.path)
        if path == "/_fake/requests":
            with LOCK:
                return self.answer(200, REQUESTS)
        if path == "/_fake/state":
            with LOCK:
                return self.answer(200, STATE)
        if path.endswith("/oauth2/v2.0/token") and method == "POST":
            form = dict(urllib.parse.parse_qsl(raw.decode()))
            tenant = path.strip("/").split("/")[0]
            ok = (
                form.get("grant_type") == "client_credentials"
                and tenant == STATE["tenant_id"]
                and form.get("client_id") == STATE["client_id"]
                and form.get("client_secret") == STATE["client_secret"]
                and form.get("scope", "").endswith("/.default")
            )
            if not ok:
                return self.answer(401, {"error": "invalid_client",
                                         "error_description": "AADSTS7000215: Invalid client secret provided."})
            token = "fake-token-%d" % len(TOKENS)
            TOKENS.add(token)
            return self.answer(200, {"token_type": "Bearer", "expires_in": 3599, "access_token": token})
        if path.startswith("/_operations/"):
            return self.answer(200, {"status": "Succeeded"})
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in TOKENS:
            return self.answer(401, error("AuthenticationFailed", "a valid bearer token is required"))
        body = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                return self.answer(400, error("InvalidRequestContent", "the body is not JSON"))
        with LOCK:
            REQUESTS.append({"method": method, "path": path, "query": query, "body": body})
        provider = provider_of(path)
        want = API_VERSIONS.get(provider)
        if want is None:
            return self.answer(404, error("NoRegisteredProviderFound", "no provider for %s" % path))
        if query.get("api-version") != want:
            return self.answer(400, error("InvalidApiVersionParameter",
                                          "api-version '%s' is not supported for %s; use %s"
                                          % (query.get("api-version"), provider, want)))
        with LOCK:
            return self.route(method, path, query, body)

    def route(self, method, path, query, body):
        key = path.lower()
        parts = path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "subscriptions":
            if parts[1] != STATE["subscription_id"]:
                return self.answer(404, error("SubscriptionNotFound", parts[1]))
            return self.answer(200, {"subscriptionId": parts[1], "displayName": STATE["display_name"], "state": "Enabled"})
        if key.endswith("/vmsizes"):
            return self.answer(200, {"value": STATE["vm_sizes"]})
        if key.endswith("/providers/microsoft.compute/virtualmachines") and method == "GET":
            rg = parts[3].lower()
            vms = [v for k, v in STATE["resources"].items()
                   if "/virtualmachines/" in k and k.split("/")[4] == rg]
            return self.answer(200, {"value": vms})
        for action in ("/instanceview", "/poweroff", "/start"):
            if key.endswith(action):
                vm = STATE["resources"].get(key[: -len(action)])
                if vm is None:
                    return self.answer(404, error("ResourceNotFound", path))
                if action == "/instanceview":
                    return self.answer(200, {"statuses": [{"code": "ProvisioningState/succeeded"},
                                                          {"code": "PowerState/" + vm["_power"]}]})
                if method != "POST":
                    return self.answer(405, error("MethodNotAllowed", path))
                vm["_power"] = "stopped" if action == "/poweroff" else "running"
                return self.answer(202, None, [("Azure-AsyncOperation", self.operation())])
        if method == "GET":
            r = STATE["resources"].get(key)
            if r is None:
                return self.answer(404, error("ResourceNotFound", "%s was not found" % path))
            return self.answer(200, r)
        if method == "DELETE":
            if STATE["resources"].pop(key, None) is None:
                return self.answer(204)
            return self.answer(202, None, [("Azure-AsyncOperation", self.operation())])
        if method == "PUT":
            problem = self.validate(provider_of(path), path, body or {})
            if problem:
                return self.answer(400, error(*problem))
            resource = dict(body)
            resource["id"] = path
            resource["name"] = parts[-1]
            if provider_of(path) == "microsoft.compute/virtualmachines":
                resource["_power"] = "stopped"
                resource["properties"]["vmId"] = "fake-" + parts[-1]
            new = key not in STATE["resources"]
            STATE["resources"][key] = resource
            return self.answer(201 if new else 200, resource,
                               [("Azure-AsyncOperation", self.operation())])
        return self.answer(405, error("MethodNotAllowed", path))

    def operation(self):
        return "http://%s/_operations/%d" % (self.headers.get("Host"), len(REQUESTS))

    def exists(self, rid):
        return isinstance(rid, str) and rid.lower() in STATE["resources"]

    def validate(self, provider, path, b):
        if not b.get("location"):
            return ("LocationRequired", "The location property is required for this definition.")
        p = b.get("properties") or {}
        if provider == "microsoft.compute/disks":
            c = p.get("creationData") or {}
            if c.get("createOption") not in ("Empty", "Import", "Copy", "FromImage"):
                return ("InvalidParameter", "creationData.createOption is required")
            if c.get("createOption") == "Import" and not (c.get("sourceUri") and c.get("storageAccountId")):
                return ("InvalidParameter", "Import needs creationData.sourceUri and creationData.storageAccountId")
        elif provider == "microsoft.network/networkinterfaces":
            configs = p.get("ipConfigurations") or []
            if not configs:
                return ("InvalidRequestFormat", "ipConfigurations is required")
            for c in configs:
                cp = c.get("properties") or {}
                if not c.get("name"):
                    return ("InvalidRequestFormat", "an ipConfiguration needs a name")
                if not self.exists((cp.get("subnet") or {}).get("id")):
                    return ("InvalidResourceReference", "subnet %s not found" % (cp.get("subnet") or {}).get("id"))
                if cp.get("privateIPAllocationMethod") == "Static" and not cp.get("privateIPAddress"):
                    return ("PrivateIPAddressRequired", "a static allocation needs privateIPAddress")
        elif provider == "microsoft.compute/virtualmachines":
            if not (p.get("hardwareProfile") or {}).get("vmSize"):
                return ("InvalidParameter", "hardwareProfile.vmSize is required")
            sp = p.get("storageProfile") or {}
            os_disk = sp.get("osDisk") or {}
            if os_disk.get("createOption") != "Attach" or not self.exists((os_disk.get("managedDisk") or {}).get("id")):
                return ("InvalidParameter", "storageProfile.osDisk must attach an existing managed disk")
            for d in sp.get("dataDisks") or []:
                if "lun" not in d or not self.exists((d.get("managedDisk") or {}).get("id")):
                    return ("InvalidParameter", "each data disk needs a lun and an existing managed disk")
            nics = (p.get("networkProfile") or {}).get("networkInterfaces") or []
            if not nics or not all(self.exists(n.get("id")) for n in nics):
                return ("InvalidParameter", "networkProfile.networkInterfaces must name existing adapters")
            av = p.get("availabilitySet")
            if av is not None and not self.exists(av.get("id")):
                return ("NotFound", "availability set %s not found" % av.get("id"))
        else:
            return ("UnsupportedResourceOperation", "this fake does not create %s" % provider)
        return None

    def do_GET(self):
        self.handle_any("GET")

    def do_PUT(self):
        self.handle_any("PUT")

    def do_POST(self):
        self.handle_any("POST")

    def do_DELETE(self):
        self.handle_any("DELETE")


def main():
    with open(sys.argv[1]) as f:
        STATE.update(json.load(f))
    STATE["resources"] = {k.lower(): v for k, v in STATE.get("resources", {}).items()}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print("FAKE_ARM_PORT=%d" % server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
