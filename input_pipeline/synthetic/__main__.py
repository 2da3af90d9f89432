"""python -m input_pipeline.synthetic --out DIR ...: see input_pipeline.synthetic.writer.main."""
from input_pipeline.synthetic.writer import main

if __name__ == '__main__':
  main()
