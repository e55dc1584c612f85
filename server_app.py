"""Flower ServerApp entry point (thin): the work lives in fedpt_app.federation.server."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpt_app.federation.server import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context)
