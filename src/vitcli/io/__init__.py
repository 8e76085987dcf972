"""The lowest layer's files: the run-directory layout, checkpoint files that survive a kill, sharded
(DCP) checkpoints, and the Hugging Face Hub reachability check. Imported by models/, data/ and engine/;
imports nothing of vitcli above errors."""
