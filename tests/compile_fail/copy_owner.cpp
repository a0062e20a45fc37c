// expect: condition_property
#include "prelude.hpp"
int main() {
  thing a;
  thing b = a;  // the property pins its owner: no copies
}
