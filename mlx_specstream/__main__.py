from mlx_specstream.cli.main import main

main()
