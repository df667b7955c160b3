"""GET /v1/models and /v1/models/{id}, the API key, and the public routes."""

import json
import urllib.error
import urllib.request

import openai
import pytest

from serving import KEY


def test_models_list_base_first_then_adapters(client, adapters, tiny_model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", "alpha", "beta"]
    assert models[0].parent is None and models[0].root == tiny_model_dir
    for m in models[1:]:
        assert m.parent == "tiny" and m.root == adapters[m.id]


def test_retrieve_and_unknown_model(client):
    assert client.models.retrieve("beta").id == "beta"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found"


def test_key_is_required_on_v1_only(server):
    from openai import OpenAI

    for key in ("wrong", ""):
        bad = OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0,
                     default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
    # the health check and the page are public
    assert json.loads(urllib.request.urlopen(server.url + "/health").read())["status"] == "ok"
    page = urllib.request.urlopen(server.url + "/").read().decode()
    assert "<title>peftune chat</title>" in page and "/static/app.js" in page
    assert b"loadModels" in urllib.request.urlopen(server.url + "/static/app.js").read()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.url + "/static/..%2Fprotocol.py")
    assert e.value.code == 404
    req = urllib.request.Request(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert len(json.loads(urllib.request.urlopen(req).read())["data"]) == 3
