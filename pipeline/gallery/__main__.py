from pipeline.gallery.cli import main

main()
