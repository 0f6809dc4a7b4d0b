"""The client side of the operators' CLI (`ledger …`): the connection, the files it reads and
writes, the columnar streams and the display of amounts. Nothing here imports the server."""
