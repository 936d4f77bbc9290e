"""Making a model present on this node, in the background (``manager``): Hugging Face downloads
(``hf_download``), copies from a peer agent (``peer_sync``, talking through ``peer_client``),
resumable files and progress. Every transfer writes a partial directory that
``genmlx.agent.store`` publishes only once it verifies.
"""
