from kdcore.cli import run

run()
