"""Bad input on the live API: a 4xx in OpenAI's error envelope naming the field and reason."""

from __future__ import annotations

import openai
import pytest
import requests


def error_of(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("body,param,words", [
    ({"prompt": "x", "size": "100x100"}, "size", "multiple of 16"),
    ({"prompt": "x", "size": "huge"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "x", "size": "4096x4096"}, "size", "limit"),
    ({"prompt": "x", "seconds": "60"}, "seconds", "over the limit"),
    ({"prompt": "x", "seconds": "-1"}, "seconds", "positive"),
    ({"prompt": "x", "seconds": "soon"}, "seconds", "number of seconds"),
    ({"prompt": ""}, "prompt", "must not be empty"),
    ({"prompt": "x" * 5000}, "prompt", "limit is 2000"),
    ({}, "prompt", "is required"),
    ({"prompt": "x", "num_inference_steps": "many"}, "num_inference_steps", "expected an integer"),
    ({"prompt": "x", "num_inference_steps": 10_000}, "num_inference_steps", "from 1 to"),
    ({"prompt": "x", "guidance_scale": -3}, "guidance_scale", "from 0 to 50"),
    ({"prompt": "x", "seed": -5}, "seed", "whole number"),
    ({"prompt": "x", "fps": 0}, "fps", "whole number from 1 to 120"),
    ({"prompt": "x", "size": "1280x720", "fps": 120, "seconds": "10"}, "size", "latent token-steps"),
    ({"prompt": "x", "model": "sora-2"}, "model", "not served here"),
    ({"prompt": "x", "colour": "red"}, "colour", "unknown parameter"),
])
def test_invalid_fields_are_400_naming_the_field(service, body, param, words):
    error = error_of(requests.post(f"{service.url}/v1/videos", json=body), 400)
    assert error["param"] == param
    assert words in error["message"]
    assert error["type"] == "invalid_request_error"


def test_sdk_raises_bad_request_with_the_param(service):
    with pytest.raises(openai.BadRequestError) as info:
        service.client().videos.create(prompt="x", size="1792x1024", seconds="4")
    assert info.value.body["param"] == "size"


def test_malformed_json(service):
    response = requests.post(f"{service.url}/v1/videos", data=b'{"prompt": "x",', 
                             headers={"Content-Type": "application/json"})
    error = error_of(response, 400)
    assert error["code"] == "invalid_json" and "line 1" in error["message"]


def test_json_that_is_not_an_object(service):
    error = error_of(requests.post(f"{service.url}/v1/videos", json=["prompt"]), 400)
    assert "JSON object" in error["message"]


def test_invalid_utf8(service):
    response = requests.post(f"{service.url}/v1/videos", data=b'{"prompt": "\xff\xfe"}',
                             headers={"Content-Type": "application/json"})
    assert error_of(response, 400)["code"] == "invalid_encoding"


def test_wrong_content_type(service):
    response = requests.post(f"{service.url}/v1/videos", data="prompt=x", headers={"Content-Type": "text/plain"})
    error = error_of(response, 415)
    assert "text/plain" in error["message"]


def test_huge_body(service):
    response = requests.post(f"{service.url}/v1/videos", data=b"{" + b" " * (2 << 20) + b"}",
                             headers={"Content-Type": "application/json"})
    assert error_of(response, 413)["code"] == "body_too_large"


def test_a_text_to_video_model_refuses_a_first_frame_naming_the_presets_that_take_one(service):
    for sent in ({"files": {"input_reference": ("ref.png", b"\x89PNG", "image/png")}, "data": {"prompt": "x"}},
                 {"json": {"prompt": "x", "input_reference": {"image_url": "data:image/png;base64,iVBORw0KGgo="}}}):
        error = error_of(requests.post(f"{service.url}/v1/videos", **sent), 400)
        assert error["param"] == "input_reference"
        assert "makes video from text only" in error["message"] and "wan2.1-i2v-14b-480p" in error["message"]


@pytest.mark.parametrize("video_id", ["video_" + "0" * 32, "nope", "..%2F..%2Fetc%2Fpasswd", "video_../../x"])
def test_unknown_or_malformed_ids_are_404(service, video_id):
    for method, path in (("get", ""), ("get", "/content"), ("delete", ""), ("post", "/cancel"), ("get", "/events")):
        response = requests.request(method, f"{service.url}/v1/videos/{video_id}{path}")
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["message"]


def test_content_before_completion_is_409(service):
    video = service.client().videos.create(prompt="not yet", seconds="1", size="64x64",
                                           extra_body={"num_inference_steps": 100})
    response = requests.get(f"{service.url}/v1/videos/{video.id}/content")
    assert error_of(response, 409)["code"] == "video_not_ready"
    requests.post(f"{service.url}/v1/videos/{video.id}/cancel")


def test_list_parameters_are_checked(service):
    assert error_of(requests.get(f"{service.url}/v1/videos", params={"limit": 0}), 400)["param"] == "limit"
    assert error_of(requests.get(f"{service.url}/v1/videos", params={"order": "up"}), 400)["param"] == "order"
    assert error_of(requests.get(f"{service.url}/v1/videos", params={"after": "video_x"}), 400)["param"] == "after"


def test_unsupported_variant(service):
    response = requests.get(f"{service.url}/v1/videos/video_{'0' * 32}/content", params={"variant": "spritesheet"})
    assert error_of(response, 400)["param"] == "variant"
