"""Writes keda.sh_v1alpha1_scaledobject.json, the JSON Schema tests/test_deploy.py checks KEDA
ScaledObjects against (kubernetes_validate knows only the built-in kinds).

Source: PyPI's cloudcoil-models-keda 2.16.1.0 (Apache-2.0): pydantic models generated from the
openAPIV3Schema of KEDA v2.16.1's CRD (config/crd/bases/keda.sh_scaledobjects.yaml). KEDA publishes
its CRDs only on GitHub, which our machines and CI cannot reach; this package carries them to PyPI
(its releases for KEDA 2.17+ need Python 3.14). To regenerate:

    python3 -m venv /tmp/keda && /tmp/keda/bin/pip install cloudcoil-models-keda==2.16.1.0
    /tmp/keda/bin/python deploy/k8s/schemas/generate.py

The pydantic schema is tightened to what `kubectl apply` enforces: an optional field is left out, not
null (pydantic writes "X or null"); an unknown field is an error (additionalProperties: false), as
kubectl's default --validate=strict makes the API server report fields the CRD does not declare;
apiVersion, kind and metadata are required. pydantic's titles and defaults are dropped.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import cloudcoil.models.keda.v1alpha1 as keda

NULL = {"type": "null"}


def tighten(node):
    if isinstance(node, list):
        return [tighten(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: tighten(v) for k, v in node.items() if k not in ("title", "default")}
    if "anyOf" in node and NULL in node["anyOf"] and len(node["anyOf"]) == 2:
        (other,) = [s for s in node.pop("anyOf") if s != NULL]
        node = {**other, **node}
    if node.get("type") == "object" and node.get("properties") and "additionalProperties" not in node:
        node["additionalProperties"] = False
    return node


def main() -> None:
    schema = tighten(keda.ScaledObject.model_json_schema(by_alias=True))
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    out = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": f"KEDA v2.16.1 ScaledObject (keda.sh/v1alpha1), from cloudcoil-models-keda "
                    f"{version('cloudcoil-models-keda')} on PyPI; written by generate.py beside this file",
        **schema,
    }
    path = Path(__file__).with_name("keda.sh_v1alpha1_scaledobject.json")
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
