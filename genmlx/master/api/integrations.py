"""``GET /api/v1/integrations``: how to point each supported client at this cluster, for the status
page. The same snippets ``genmlx integrations`` prints (``genmlx.wire.integrations``), always with
the key as the ``$(genmlx token --show)`` placeholder: the page never holds the token."""

from __future__ import annotations

from genmlx.master.api.proxy import ready_models
from genmlx.master.api.stream import ReadEndpoint
from genmlx.wire.integrations import Target, render_all


class IntegrationsHandler(ReadEndpoint):
    """The snippets for the master's URL as this request reached it, and its Ready models;
    ``?model=NAME`` picks the model they name (default: the first Ready one)."""

    def get(self) -> None:
        master_url = f"{self.request.protocol}://{self.request.host}"
        ready = ready_models(self.reconciler)
        target = Target(master_url, ready, model=self.get_query_argument("model", None) or None)
        integrations = [i.to_json() for i in render_all(target)]
        self.set_header("Cache-Control", "no-store")
        self.write_json(200, {"readyModels": list(ready), "integrations": integrations})
