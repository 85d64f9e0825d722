# ESM-2 recipe on NVIDIA's PyTorch container, which already carries PyTorch, TransformerEngine and flash-attn.
#   docker build -t esm2-recipe .
#   docker run --rm --gpus all --ipc=host esm2-recipe python -m pytest -q
#   docker run --rm --gpus all --ipc=host esm2-recipe torchrun --nproc_per_node 1 train_fsdp2.py --config-name L0_sanity
# For Slurm with enroot/pyxis: `enroot import dockerd://esm2-recipe` and CONTAINER_IMAGE=<the .sqsh> for slurm.sh.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    WANDB_MODE=offline \
    HF_HUB_OFFLINE=1
WORKDIR /workspace/esm2-recipe

# The container's own torch and transformer-engine stay: install the rest, then this project without dependencies.
COPY pyproject.toml README.md ./
COPY recipe ./recipe
RUN pip install "transformers>=5.0" "hydra-core>=1.3" "omegaconf>=2.3" "datasets>=3.0" "torchdata>=0.11" \
        "safetensors>=0.4" "tqdm>=4.66" "wandb>=0.18" "pytest>=8" \
 && pip install --no-deps -e .

COPY . .
CMD ["bash"]
