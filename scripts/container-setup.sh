#!/bin/sh
# Runs while the container image is built (bentofile docker.setup_script).
# The Hugging Face cache must exist in the image, owned by the bentoml user (uid 1034), so a
# named volume mounted over it starts writable.
set -e
mkdir -p /home/bentoml/hf
chown -R 1034:1034 /home/bentoml/hf
