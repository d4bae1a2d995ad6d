from vaccelray.cli import main

main()
