from shadownet.cli import run

run()
