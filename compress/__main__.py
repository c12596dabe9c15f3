from compress.cli import main

main(prog_name="compress")
