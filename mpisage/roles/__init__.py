"""One loop per role: the F-server (rank 0), the S-server (rank 1), the clients (ranks 2..); synchronous methods
run client.py/sserver.py/fserver.py, asynchronous ones asynchronous.py."""
